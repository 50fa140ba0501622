"""Builds the corpus of broken inputs (in a temporary folder, nothing binary committed) used by the failure tests."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def good_volume(path: Path, shape=(24, 40, 40), seed=0, dtype=np.int16) -> Path:
    """A small CT-like volume (HU values) with 1.5 mm spacing."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(-300, 300, size=shape).clip(-1024, 1500).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.5, 2.0))
    sitk.WriteImage(img, str(path))
    return path


def build_bad_files(root: Path) -> dict[str, Path]:
    """Every kind of broken volume a real archive contains; returns name -> path."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    files["missing"] = root / "does_not_exist.nii.gz"
    good = good_volume(root / "full.nii.gz")
    truncated = root / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["truncated"] = truncated
    notimg = root / "notes.nii.gz"
    notimg.write_bytes(gzip.compress(b"patient notes, not an image\n" * 50))
    files["not_an_image"] = notimg
    files["2d"] = root / "slice2d.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 40), np.int16)), str(files["2d"]))
    files["4d"] = root / "series4d.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 8, 16, 16), np.int16), isVector=False), str(files["4d"]))
    nan = np.zeros((16, 24, 24), np.float32)
    nan[3, 4, 5] = np.nan
    files["nan"] = root / "nan_voxels.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(files["nan"]))
    inf = np.zeros((16, 24, 24), np.float32)
    inf[0, 0, 0] = np.inf
    files["inf"] = root / "inf_voxels.mha"
    sitk.WriteImage(sitk.GetImageFromArray(inf), str(files["inf"]))
    files["one_slice"] = root / "one_slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 40, 40), np.int16)), str(files["one_slice"]))
    files["absurd"] = absurd_header(root / "absurd.nii")
    return files


def absurd_header(path: Path) -> Path:
    """An uncompressed NIfTI whose header claims 32767^3 voxels (about 70 TB) over a few bytes of data."""
    good = good_volume(path.with_name("small_for_header.nii"), shape=(4, 4, 4))
    raw = bytearray(good.read_bytes())
    struct.pack_into("<hhh", raw, 42, 32767, 32767, 32767)  # dim[1..3] of the NIfTI-1 header
    path.write_bytes(bytes(raw))
    return path


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n" if header or rows else "")
    return path


def flip_bytes(src: Path, dst: Path, at: float = 0.5, n: int = 4) -> Path:
    """A copy of `src` with `n` bytes inverted at fraction `at` of its length (bit rot, a bad sector): same size."""
    raw = bytearray(Path(src).read_bytes())
    i = int(len(raw) * at)
    raw[i:i + n] = bytes(b ^ 0xFF for b in raw[i:i + n])
    Path(dst).write_bytes(bytes(raw))
    return Path(dst)


def cut_file(src: Path, dst: Path, keep: float = 0.6) -> Path:
    """The first `keep` of `src` (an interrupted copy or download)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[:int(len(data) * keep)])
    return Path(dst)


def zero_spacing(root: Path) -> dict[str, Path]:
    """A MetaImage whose header says `ElementSpacing = 0 1.5 2` and a NIfTI whose pixdim[1] is 0."""
    mha = good_volume(root / "spacing_ok.mha", shape=(8, 12, 12))
    files = {"mha": root / "zero_spacing.mha", "nii": root / "zero_pixdim.nii"}
    files["mha"].write_bytes(mha.read_bytes().replace(b"ElementSpacing = 1.5 1.5 2", b"ElementSpacing = 0 1.5 2"))
    raw = bytearray(good_volume(root / "spacing_ok.nii", shape=(8, 12, 12)).read_bytes())
    struct.pack_into("<f", raw, 80, 0.0)  # pixdim[1] of the NIfTI-1 header
    files["nii"].write_bytes(bytes(raw))
    return files
