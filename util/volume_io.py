"""Reading CT volumes with SimpleITK, with the checks that turn broken files into one clear sentence.

Formats: NIfTI (.nii, .nii.gz), NRRD, MetaImage (.mha/.mhd) and DICOM series folders. Headers are checked
before pixels are read, so an absurd size is refused before anything is allocated.
"""
from __future__ import annotations

import gzip
import os
import struct
import warnings
from typing import Sequence

import numpy as np
import SimpleITK as sitk

MAX_VOXELS = 1.5e9

class VolumeError(ValueError):
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


def _nifti_layout(hdr: bytes) -> tuple[int, int, np.dtype | None] | None:
    """(data offset, data bytes, float dtype or None) of a single-file NIfTI-1/2 header; None if unknown."""
    for e in "<>":
        if len(hdr) >= 348 and struct.unpack(e + "i", hdr[:4])[0] == 348:
            dims, (code, bitpix) = struct.unpack(e + "8h", hdr[40:56]), struct.unpack(e + "2h", hdr[70:74])
            offset = int(struct.unpack(e + "f", hdr[108:112])[0])
        elif len(hdr) >= 540 and struct.unpack(e + "i", hdr[:4])[0] == 540:
            dims, (code, bitpix) = struct.unpack(e + "8q", hdr[16:80]), struct.unpack(e + "2h", hdr[12:16])
            offset = struct.unpack(e + "q", hdr[168:176])[0]
        else:
            continue
        if not 1 <= dims[0] <= 7:
            return None
        fdtype = {16: np.dtype(e + "f4"), 64: np.dtype(e + "f8")}.get(code)
        return offset, int(np.prod(dims[1:1 + dims[0]], dtype=np.int64)) * bitpix // 8, fdtype
    return None


def _check_nifti(path: str) -> None:
    """ITK reads a truncated NIfTI silently (zeros) and turns NaN into 0: check length and float voxels here."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            layout = _nifti_layout(f.read(540))
    except (OSError, EOFError):
        layout = (0, 1, None)
    if layout is None:
        return
    offset, nbytes, fdtype = layout
    if fdtype is None:  # integer voxels: only the length matters (file size, or the gzip trailer's length)
        if opener is open and os.path.getsize(path) >= offset + nbytes:
            return
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if opener is gzip.open and struct.unpack("<I", f.read(4))[0] == (offset + nbytes) % 2 ** 32:
                return
    try:  # float voxels (or a length mismatch): read the data once
        with opener(path, "rb") as f:
            f.seek(offset)
            data = f.read(nbytes)
    except (OSError, EOFError):
        data = b""
    if len(data) < nbytes:
        raise VolumeError(f"{path}: is truncated or corrupt (its header promises {offset + nbytes:,} bytes); "
                          f"copy the file again.")
    if fdtype is not None and not np.isfinite(np.frombuffer(data, fdtype)).all():
        raise VolumeError(f"{path}: contains NaN or infinite voxels; expected finite HU values.")


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
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise VolumeError(f"{path}: reading the DICOM series failed ({str(e).strip().splitlines()[-1]}).") from None


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
    if path.lower().endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise VolumeError(f"{path}: is truncated or corrupt ({str(e).strip().splitlines()[-1][:200]}).") from None
    return img[:, :, :, 0] if img.GetDimension() == 4 else img
