"""Reading CT volumes with SimpleITK, with the checks that turn broken files into one clear sentence.

Formats: NIfTI (.nii, .nii.gz), NRRD, MetaImage (.mha/.mhd) and DICOM series folders. Headers are checked
before pixels are read, so an absurd size is refused before anything is allocated. What ITK reads without a
word is checked here: a gzip stream's CRC and length, a MetaImage's zlib data, a detached data file, the spacing
in the header, and a DICOM series' slice positions (a missing or unreadable slice). A .nii.gz is decompressed once
(ISA-L, checked on the way) and the image made from those bytes, so the check costs no second decompression.
"""
from __future__ import annotations

import math
import os
import struct
import tempfile
import warnings
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from isal import igzip_lib

from util.errors import UserError

MAX_VOXELS = 1.5e9
NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}
SITK_DTYPES = {sitk.sitkUInt8: "u1", sitk.sitkInt8: "i1", sitk.sitkUInt16: "u2", sitk.sitkInt16: "i2",
               sitk.sitkUInt32: "u4", sitk.sitkInt32: "i4", sitk.sitkUInt64: "u8", sitk.sitkInt64: "i8",
               sitk.sitkFloat32: "f4", sitk.sitkFloat64: "f8"}
MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
             "MET_FLOAT": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_DOUBLE": 8}  # MetaImage voxel sizes
SLICE_GAP_TOLERANCE = 0.05  # DICOM: a gap between slice positions may differ this much (relative) from the median


class VolumeError(UserError):
    """A volume that cannot be used; the message is one sentence that starts with the file path."""


def _check_header(path: str, dim: int, size: Sequence[int], ncomp: int, volumes: int = 1) -> None:
    """Refuse what is not one scalar 3D volume (`volumes` > 1: a 4D file of exactly that many 3D volumes, the
    channels), from the header alone (before any voxel is allocated)."""
    hint = " (for DICOM, pass the folder that holds the series)" if path.lower().endswith(".dcm") else ""
    if ncomp != 1:
        raise VolumeError(f"{path}: has {ncomp} components per voxel; expected a grey-level (scalar) volume.")
    if dim == 2:
        raise VolumeError(f"{path}: is a 2D image of size {tuple(size)}; expected a 3D volume{hint}.")
    if volumes > 1 and (dim != 4 or size[3] != volumes):
        got = f"{size[3]} volumes along its 4th axis" if dim == 4 else f"a {dim}D image"
        raise VolumeError(f"{path}: is {got}; --channels names {volumes} channels, so a Path holding them all "
                          f"must be a 4D file of {volumes} volumes (or name one column per channel).")
    if dim == 4 and size[3] > 1 and volumes == 1:
        raise VolumeError(f"{path}: is a 4D image of size {tuple(size)}; expected a single 3D volume (a 4D file of "
                          f"channels needs --channels naming them in order).")
    if dim not in (3, 4):
        raise VolumeError(f"{path}: is a {dim}D image; expected a 3D volume.")
    if min(size[:3]) < 2:
        raise VolumeError(f"{path}: has size {tuple(size[:3])} (x, y, z); expected at least 2 voxels along every "
                          f"axis{hint}.")
    if float(np.prod(size, dtype=np.float64)) > MAX_VOXELS:
        raise VolumeError(f"{path}: has {int(np.prod(size, dtype=np.float64)):,} voxels {tuple(size)}, more than "
                          f"the {MAX_VOXELS:.2g} this loader accepts.")


def _check_spacing(path: str, spacing: Sequence[float]) -> None:
    """Refuse a zero, negative or NaN voxel size (ITK would fail later as "corrupt", or resample wrongly)."""
    bad = next((s for s in spacing[:3] if not (math.isfinite(s) and s > 0)), None)
    if bad is not None:
        shown = " x ".join(f"{s:g}" for s in spacing[:3])
        raise VolumeError(f"{path}: has spacing {bad:g} in its header ({shown} mm); expected a positive voxel size "
                          f"on every axis.")


def _inflate(path: str, offset: int = 0, kind: str = "gzip") -> bytes:
    """The decompressed bytes of the gzip (every member) or zlib stream of `path` from `offset`, decompressed once by
    ISA-L, which verifies each gzip member's CRC-32 and length (the zlib stream's Adler-32); a damaged or cut stream
    raises VolumeError (ITK reads such files silently, with about half of their voxels wrong)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    flag, parts = igzip_lib.DECOMP_GZIP if kind == "gzip" else igzip_lib.DECOMP_ZLIB, []
    while True:
        d = igzip_lib.IgzipDecompressor(flag=flag)
        try:
            parts.append(d.decompress(data))
        except igzip_lib.IsalError as e:  # "Error -6 Incorrect checksum found", "... Invalid block ..."
            why = str(e).split(" ", 2)[-1] if str(e).startswith("Error ") else str(e)
            raise VolumeError(f"{path}: is corrupt (its {kind} data fails its check: {why.lower()}); copy the file "
                              f"again.") from None
        if not d.eof:
            raise VolumeError(f"{path}: is truncated (its {kind} stream ends early); copy the file again.")
        data = d.unused_data
        if kind != "gzip" or not data.strip(b"\0"):  # another gzip member may follow; zero padding is ignored
            return parts[0] if len(parts) == 1 else b"".join(parts)


def _nifti_layout(hdr: bytes) -> tuple[int, int, np.dtype | None, tuple] | None:
    """(data offset, data bytes, float dtype or None, pixdim[1:4]) of a single-file NIfTI-1/2 header; None if
    unknown."""
    for e in "<>":
        if len(hdr) >= 348 and struct.unpack(e + "i", hdr[:4])[0] == 348:
            dims, (code, bitpix) = struct.unpack(e + "8h", hdr[40:56]), struct.unpack(e + "2h", hdr[70:74])
            offset, pixdim = int(struct.unpack(e + "f", hdr[108:112])[0]), struct.unpack(e + "3f", hdr[80:92])
        elif len(hdr) >= 540 and struct.unpack(e + "i", hdr[:4])[0] == 540:
            dims, (code, bitpix) = struct.unpack(e + "8q", hdr[16:80]), struct.unpack(e + "2h", hdr[12:16])
            offset, pixdim = struct.unpack(e + "q", hdr[168:176])[0], struct.unpack(e + "3d", hdr[112:136])
        else:
            continue
        if not 1 <= dims[0] <= 7:
            return None
        fdtype = {16: np.dtype(e + "f4"), 64: np.dtype(e + "f8")}.get(code)
        return offset, int(np.prod(dims[1:1 + dims[0]], dtype=np.int64)) * bitpix // 8, fdtype, pixdim
    return None


def _check_nifti(path: str, layout: tuple, size: int, voxels) -> None:
    """What ITK reads silently from a NIfTI of `size` bytes: a zero or NaN pixdim (replaced by 1 mm), a cut file
    (read as zeros), NaN voxels (turned into 0). voxels(dtype) returns the voxels as that dtype (float files)."""
    offset, nbytes, fdtype, pixdim = layout
    _check_spacing(path, [abs(p) for p in pixdim])  # a negative pixdim is read as its magnitude by ITK
    if size < offset + nbytes:
        raise VolumeError(f"{path}: is truncated (its header promises {offset + nbytes:,} bytes, it holds {size:,}); "
                          f"copy the file again.")
    if fdtype is not None and not np.isfinite(voxels(fdtype)).all():
        raise VolumeError(f"{path}: contains NaN or infinite voxels; expected finite HU values.")


def _itk_keeps_voxels(hdr: bytes, reader: sitk.ImageFileReader) -> np.dtype | None:
    """The stored dtype of a NIfTI-1 file's voxels when ITK returns them unchanged (3D, no intensity scaling,
    the pixel type ITK reports for the header); None when ITK would convert them."""
    for e in "<>":
        if len(hdr) >= 348 and struct.unpack(e + "i", hdr[:4])[0] == 348 and hdr[344:348] == b"n+1\0":
            kind = NIFTI_DTYPES.get(struct.unpack(e + "h", hdr[70:72])[0])
            slope, inter = struct.unpack(e + "2f", hdr[112:120])  # ITK applies inter even with slope 0
            if (reader.GetDimension() == 3 and kind is not None and kind == SITK_DTYPES.get(reader.GetPixelID())
                    and slope in (0.0, 1.0) and inter == 0.0):
                return np.dtype(e + kind)
    return None


def _read_nifti(path: str, reader: sitk.ImageFileReader) -> sitk.Image | None:
    """Check a NIfTI (`_check_nifti`); a .nii.gz is decompressed once (`_inflate`) and the image is made from those
    checked bytes with the geometry and pixel type ITK's reader took from the header (ReadImageInformation), so it
    equals reader.Execute()'s without ITK decompressing the file again; where ITK would convert the voxels (scaling,
    4D) ITK reads an uncompressed temporary copy. A .nii is left to ITK (None)."""
    if not _gzipped(path):  # a .nii.gz that is not compressed is read as it is (ITK does the same)
        with open(path, "rb") as f:
            layout = _nifti_layout(f.read(540))
        if layout is not None:
            _check_nifti(path, layout, os.path.getsize(path),
                         lambda dt: np.fromfile(path, dt, count=layout[1] // dt.itemsize, offset=layout[0]))
        return None
    raw = _inflate(path)
    layout = _nifti_layout(raw[:540])
    if layout is not None:
        _check_nifti(path, layout, len(raw),
                     lambda dt: np.frombuffer(raw, dt, count=layout[1] // dt.itemsize, offset=layout[0]))
    dtype = None if layout is None else _itk_keeps_voxels(raw[:348], reader)
    if dtype is None:
        return _read_uncompressed_copy(path, raw)
    arr = np.frombuffer(raw, dtype, count=layout[1] // dtype.itemsize, offset=layout[0])
    img = sitk.GetImageFromArray(arr.astype(dtype.newbyteorder("="), copy=False).reshape(reader.GetSize()[::-1]))
    img.SetSpacing(reader.GetSpacing())
    img.SetOrigin(reader.GetOrigin())
    img.SetDirection(reader.GetDirection())
    return img


def _gzipped(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _read_uncompressed_copy(path: str, raw: bytes) -> sitk.Image:
    """ITK's reading of the decompressed bytes `raw` of the NIfTI `path`, from a temporary .nii."""
    fd, tmp = tempfile.mkstemp(suffix=".nii")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        return sitk.ReadImage(tmp)
    except RuntimeError as e:
        raise VolumeError(f"{path}: is truncated or corrupt ({str(e).strip().splitlines()[-1][:200]}).") from None
    finally:
        os.unlink(tmp)


def _text_header(path: str, stop) -> tuple[dict[str, str], int]:
    """`key = value` / `key: value` lines of a MetaImage or NRRD header, lower-cased keys, up to the line for
    which stop(key) is true (MetaImage) or a blank line (NRRD); and the byte offset where the data starts."""
    fields, pos = {}, 0
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    for line in head.splitlines(keepends=True):
        pos += len(line)
        text = line.decode("latin-1").strip()
        if not text:
            break
        key, _, value = text.partition("=" if "=" in text.split(":")[0] else ":")
        fields[key.strip().lower()] = value.strip()
        if stop(key.strip().lower()):
            break
    return fields, pos


def _check_detached(path: str) -> None:
    """A MetaImage/NRRD header whose data file is missing, or whose compressed data is damaged or cut."""
    if path.lower().endswith((".mha", ".mhd")):
        fields, pos = _text_header(path, lambda k: k == "elementdatafile")
        name, compressed = fields.get("elementdatafile", "LOCAL"), fields.get("compresseddata", "").lower() == "true"
    else:
        fields, pos = _text_header(path, lambda k: False)
        name, compressed = fields.get("data file", fields.get("datafile", "LOCAL")), False
    if name.upper().startswith("LIST") or "%" in name or " " in name:  # a list of slice files: ITK checks them
        return
    data_path, offset = (path, pos) if name.upper() == "LOCAL" else (os.path.join(os.path.dirname(path), name), 0)
    skip = fields.get("headersize", "0")  # MetaImage: bytes before the voxels of a data file (-1: at its end)
    if not os.path.isfile(data_path):
        raise VolumeError(f"{path}: the data file {data_path} named by its header is missing; copy it next to the "
                          f"header.")
    if skip.lstrip("-").isdigit() and int(skip) > 0:
        offset += int(skip)
    elif skip != "0":
        return
    if compressed:  # MetaIO prints "Uncompress failed" and returns the damaged voxels
        _inflate(data_path, offset, kind="zlib")
        return
    try:
        itemsize = MET_BYTES.get(fields.get("elementtype", ""), 0) * int(fields.get("elementnumberofchannels", 1))
        nbytes = itemsize * int(np.prod([int(v) for v in fields.get("dimsize", "").split()], dtype=np.int64))
    except ValueError:
        return
    held = os.path.getsize(data_path) - offset
    if held < nbytes:
        raise VolumeError(f"{path}: is truncated (its header promises {nbytes:,} bytes of voxels, "
                          f"{os.path.basename(data_path)} holds {held:,}); copy the file again.")


def _unread_dicom_files(path: str, series: list) -> list[str]:
    """Files of the folder that look like DICOM (.dcm, or the DICM marker) but are in no readable series."""
    used = {os.path.abspath(f) for files in series for f in files}
    out = []
    for name in sorted(os.listdir(path)):
        f = os.path.abspath(os.path.join(path, name))
        if f in used or not os.path.isfile(f) or name.startswith("."):
            continue
        with open(f, "rb") as fh:
            magic = fh.read(132)[128:]
        if magic == b"DICM" or name.lower().endswith(".dcm"):
            out.append(f)
    return out


def _check_slice_positions(path: str, reader: sitk.ImageSeriesReader, n: int) -> None:
    """Slices must be evenly spaced along the slice normal; a gap means a missing slice (ITK only warns)."""
    try:
        pos = [[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)]
        cos = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
    except (RuntimeError, ValueError):  # no ImagePositionPatient / orientation: nothing to compare
        return
    if len(cos) != 6 or any(len(p) != 3 for p in pos):
        return
    normal = np.cross(cos[:3], cos[3:])
    z = np.sort(np.asarray(pos) @ normal)
    gaps = np.diff(z)
    step = float(np.median(gaps))
    bad = np.abs(gaps - step) > max(0.01, SLICE_GAP_TOLERANCE * step)
    if step <= 0 or bad.any():
        k = int(np.argmax(bad)) if bad.any() else 0
        raise VolumeError(f"{path}: its {n} DICOM slices are not evenly spaced ({gaps[k]:.3g} mm between slices "
                          f"{k + 1} and {k + 2}, {step:.3g} mm elsewhere); a slice is missing or duplicated.")


def _read_dicom_series(path: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    try:
        ids = reader.GetGDCMSeriesIDs(path)
    except RuntimeError:
        ids = ()
    if not ids:
        raise VolumeError(f"{path}: is a folder without a DICOM series; expected an image file or a DICOM folder.")
    series = [reader.GetGDCMSeriesFileNames(path, sid) for sid in ids]
    files = max(series, key=len)
    if len(series) > 1:
        warnings.warn(f"{path}: holds {len(series)} DICOM series; using the largest ({len(files)} files).")
    if len(files) == 1:  # one multi-frame file (Enhanced CT): the file holds the whole volume
        return _read_file(files[0])
    head = sitk.ImageFileReader()
    head.SetFileName(files[0])
    try:
        head.ReadImageInformation()
    except RuntimeError:
        raise VolumeError(f"{path}: its first DICOM file {files[0]} cannot be read.") from None
    _check_header(path, 3, (*head.GetSize()[:2], len(files)), head.GetNumberOfComponents())
    unread = _unread_dicom_files(path, series)
    if unread:
        more = f" (and {len(unread) - 1} more)" if len(unread) > 1 else ""
        raise VolumeError(f"{path}: its DICOM file {os.path.basename(unread[0])}{more} cannot be read, so the series "
                          f"would miss a slice; copy the folder again or remove that file.")
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise VolumeError(f"{path}: reading the DICOM series failed ({str(e).strip().splitlines()[-1]}).") from None
    _check_slice_positions(path, reader, len(files))
    _check_spacing(path, img.GetSpacing())
    return img


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read one 3D volume (.nii/.nii.gz/.nrrd/.mha/.mhd or a DICOM series folder), validated from its header first."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VolumeError(f"{path}: file not found.")
    if os.path.isdir(path):
        return _read_dicom_series(path)
    return _read_file(path)


def read_volumes(path: str | os.PathLike, volumes: int) -> list[sitk.Image]:
    """The `volumes` 3D volumes of a 4D file (the last axis: the channels, as a 4D NIfTI stores them), each with
    the file's 3D geometry; anything else is refused in one sentence naming the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VolumeError(f"{path}: file not found.")
    if os.path.isdir(path):
        raise VolumeError(f"{path}: is a folder; a row's channels in one Path need a 4D file of {volumes} volumes.")
    img = _read_file(path, volumes)
    return [img[:, :, :, k] for k in range(volumes)]


def _read_file(path: str, volumes: int = 1) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        if _gzipped(path):  # a damaged or cut stream is named as such (ITK only fails to read the header)
            _inflate(path)
        raise VolumeError(f"{path}: is not a readable image; expected NIfTI, NRRD, MetaImage or a DICOM folder.") \
            from None
    size = reader.GetSize()
    _check_header(path, reader.GetDimension(), size, reader.GetNumberOfComponents(), volumes)
    _check_spacing(path, reader.GetSpacing())
    img = None
    if volumes > 1:
        if _gzipped(path):
            _inflate(path)  # the stream's checksums: a damaged 4D file is refused like a 3D one
    elif path.lower().endswith((".nii", ".nii.gz")):
        img = _read_nifti(path, reader)
    elif path.lower().endswith((".mha", ".mhd", ".nrrd", ".nhdr")):
        _check_detached(path)
    if img is None:
        try:
            img = reader.Execute()
        except RuntimeError as e:
            raise VolumeError(f"{path}: is truncated or corrupt ({str(e).strip().splitlines()[-1][:200]}).") from None
    return img if volumes > 1 else img[:, :, :, 0] if img.GetDimension() == 4 else img
