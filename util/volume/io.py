"""Reading CT volumes with SimpleITK, with the checks that turn broken files into one clear sentence.

Formats: NIfTI (.nii, .nii.gz), NRRD, MetaImage (.mha/.mhd) and DICOM series folders. Headers are checked
before pixels are read, so an absurd size is refused before anything is allocated. What ITK reads without a
word is checked here: a gzip stream's CRC and length, a MetaImage's zlib data, a detached data file, the spacing
in the header, and a DICOM series' slice positions (a missing or unreadable slice).
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import warnings
import zlib
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from util.errors import UserError

MAX_VOXELS = 1.5e9
CHUNK = 1 << 22  # bytes read at a time when a compressed stream is checked
MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
             "MET_FLOAT": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_DOUBLE": 8}  # MetaImage voxel sizes
SLICE_GAP_TOLERANCE = 0.05  # DICOM: a gap between slice positions may differ this much (relative) from the median


class VolumeError(UserError):
    """A volume that cannot be used; the message is one sentence that starts with the file path."""


def _check_header(path: str, dim: int, size: Sequence[int], ncomp: int) -> None:
    """Refuse what is not one scalar 3D volume, from the header alone (before any voxel is allocated)."""
    hint = " (for DICOM, pass the folder that holds the series)" if path.lower().endswith(".dcm") else ""
    if ncomp != 1:
        raise VolumeError(f"{path}: has {ncomp} components per voxel; expected a grey-level (scalar) volume.")
    if dim == 2:
        raise VolumeError(f"{path}: is a 2D image of size {tuple(size)}; expected a 3D volume{hint}.")
    if dim == 4 and size[3] > 1:
        raise VolumeError(f"{path}: is a 4D image of size {tuple(size)}; expected a single 3D volume.")
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


def _gunzip_chunks(path: str, offset: int = 0, wbits: int = 31):
    """Decompressed chunks of the gzip (wbits 31) or zlib (15) stream of `path` from `offset`, every member's
    checksum and length verified by zlib; a damaged or cut stream raises VolumeError (ITK may read it silently)."""
    kind = "gzip" if wbits == 31 else "zlib"
    d, started = zlib.decompressobj(wbits), False
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(CHUNK):
            while block:
                try:
                    out = d.decompress(block)
                except zlib.error as e:
                    why = str(e).rsplit(": ", 1)[-1]  # "incorrect data check" (CRC), "invalid block type", ...
                    raise VolumeError(f"{path}: is corrupt (its {kind} data fails its check: {why}); copy the file "
                                      f"again.") from None
                started = True
                if out:
                    yield out
                block = b""
                if d.eof:  # another gzip member may follow (zero padding after the last one is ignored)
                    rest = d.unused_data
                    if wbits != 31 or not rest.strip(b"\0"):
                        return
                    d, block = zlib.decompressobj(wbits), rest
    if started and not d.eof:
        raise VolumeError(f"{path}: is truncated (its {kind} stream ends early); copy the file again.")


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


def _check_nifti(path: str) -> None:
    """What ITK reads silently from a NIfTI: a damaged gzip stream, a cut file (zeros), NaN voxels (turned into 0),
    a zero or NaN pixdim (replaced by 1 mm). A .nii.gz is decompressed once here to verify its CRC and length."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"  # a .nii.gz that is not compressed is read as it is (ITK does the same)
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            layout = _nifti_layout(f.read(540))
    except (OSError, EOFError):  # a header that does not decompress: the stream check below names it
        layout = None
    if gz:
        data = [] if layout is not None and layout[2] is not None else None  # keep the voxels only when floats
        size = 0
        for chunk in _gunzip_chunks(path):
            size += len(chunk)
            if data is not None:
                data.append(chunk)
        data = b"".join(data)[layout[0]:layout[0] + layout[1]] if data is not None else None
    if layout is None:
        return
    offset, nbytes, fdtype, pixdim = layout
    _check_spacing(path, [abs(p) for p in pixdim])  # a negative pixdim is read as its magnitude by ITK
    if not gz:
        size = os.path.getsize(path)
        if fdtype is not None and size >= offset + nbytes:
            data = np.fromfile(path, np.uint8, count=nbytes, offset=offset).tobytes()
    if size < offset + nbytes:
        raise VolumeError(f"{path}: is truncated (its header promises {offset + nbytes:,} bytes, it holds {size:,}); "
                          f"copy the file again.")
    if fdtype is not None and not np.isfinite(np.frombuffer(data, fdtype)).all():
        raise VolumeError(f"{path}: contains NaN or infinite voxels; expected finite HU values.")


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
        for _ in _gunzip_chunks(data_path, offset, wbits=15):
            pass
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


def _read_file(path: str) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise VolumeError(f"{path}: is not a readable image; expected NIfTI, NRRD, MetaImage or a DICOM folder.") \
            from None
    size = reader.GetSize()
    _check_header(path, reader.GetDimension(), size, reader.GetNumberOfComponents())
    _check_spacing(path, reader.GetSpacing())
    if path.lower().endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    elif path.lower().endswith((".mha", ".mhd", ".nrrd", ".nhdr")):
        _check_detached(path)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise VolumeError(f"{path}: is truncated or corrupt ({str(e).strip().splitlines()[-1][:200]}).") from None
    return img[:, :, :, 0] if img.GetDimension() == 4 else img
