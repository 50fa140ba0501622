"""Volume I/O and preprocessing (one code path for every script) and the pretraining `Custom3DDataset`.

Pipeline: read (SimpleITK: NIfTI, NRRD, MetaImage, DICOM series folder) -> reorient to one orientation (LPS)
-> resample (whole volume to `size` keeping its physical extent, or to `spacing` then pad) -> HU window ->
[0, 1] float32 [D, H, W] -> optional cache -> crop / flips -> tensor [1, D, H, W].
Adapt `Custom3DDataset` (or `read_path_table`) to your data layout; keep the preprocessing functions shared.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset

from util.cache import VolumeCache, decode
from util.volume_io import MAX_VOXELS, VolumeError, read_image  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)
PREPROCESS_VERSION = 1  # bump when the preprocessing code changes what it produces (invalidates caches)
INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline,
                 "lanczos": sitk.sitkLanczosWindowedSinc, "label_gaussian": sitk.sitkLabelGaussian}


def _triple(x, name: str, kind=int) -> tuple | None:
    if x is None:
        return None
    t = tuple(kind(v) for v in (x if isinstance(x, (tuple, list)) else (x,) * 3))
    if len(t) != 3 or any(v <= 0 for v in t):
        raise ValueError(f"{name} must be one positive number or three (D, H, W), got {x!r}.")
    return t


@dataclass
class PreprocessConfig:
    """Preprocessing settings, stored in every checkpoint. Sizes and spacings are (D, H, W).

    spacing None: resample the whole volume to `size` keeping its physical extent (TANGERINE default 256^3).
    spacing given: resample to that spacing (mm), then pad every axis to >= size (datasets crop later).
    Both None: keep the native grid (reorientation and windowing only).
    """

    orientation: str = "LPS"
    size: tuple[int, int, int] | None = (256, 256, 256)
    spacing: tuple[float, float, float] | None = None
    window: tuple[float, float] = (-1200.0, 800.0)
    interpolator: str = "bspline"
    mask_interpolator: str = "nearest"

    def __post_init__(self) -> None:
        self.orientation = str(self.orientation).upper()
        axis = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}
        if sorted(axis.get(c, -1) for c in self.orientation) != [0, 1, 2]:
            raise ValueError(f"PreprocessConfig.orientation must be three letters, one of each L/R, P/A, S/I "
                             f"(e.g. 'LPS'), got {self.orientation!r}.")
        self.size = _triple(self.size, "PreprocessConfig.size")
        self.spacing = _triple(self.spacing, "PreprocessConfig.spacing", float)
        self.window = tuple(float(v) for v in self.window)
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise ValueError(f"PreprocessConfig.window must be (low, high) HU with low < high, got {self.window}.")
        for name in ("interpolator", "mask_interpolator"):
            if getattr(self, name) not in INTERPOLATORS:
                raise ValueError(f"PreprocessConfig.{name} must be one of {sorted(INTERPOLATORS)}, "
                                 f"got {getattr(self, name)!r}.")

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        """Inverse of `to_dict`; unknown keys are refused."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"PreprocessConfig.from_dict: unknown keys {sorted(unknown)}.")
        return cls(**d)

    def key(self) -> str:
        """Stable 16-hex-digit hash of the settings and of PREPROCESS_VERSION (cache keys)."""
        blob = json.dumps({**self.to_dict(), "_version": PREPROCESS_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ preprocessing
def reorient(img: sitk.Image, orientation: str = "LPS") -> sitk.Image:
    """Permute/flip the axes so they point to `orientation` (DICOM letters); the physical image is unchanged."""
    current = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())
    return img if current == orientation else sitk.DICOMOrient(img, orientation)


def resample_centered(img: sitk.Image, size_xyz: Sequence[int], spacing_xyz: Sequence[float],
                      interpolator: int, default_value: float = 0.0, pixel_type: int | None = None) -> sitk.Image:
    """Resample onto a grid of `size_xyz` x `spacing_xyz` (same direction) centred on the volume's physical box.

    When size * spacing equals the input's extent, the physical box (voxel corners) is exactly preserved.
    """
    d = np.array(img.GetDirection()).reshape(3, 3)
    n0, s0 = np.array(img.GetSize(), float), np.array(img.GetSpacing())
    n1, s1 = np.array(size_xyz, float), np.array(spacing_xyz, float)
    origin = np.array(img.GetOrigin()) + d @ ((n0 * s0 - n1 * s1) / 2 + (s1 - s0) / 2)
    f = sitk.ResampleImageFilter()
    f.SetSize([int(v) for v in size_xyz])
    f.SetOutputSpacing(s1.tolist())
    f.SetOutputOrigin(origin.tolist())
    f.SetOutputDirection(img.GetDirection())
    f.SetInterpolator(interpolator)
    f.SetDefaultPixelValue(float(default_value))
    f.SetOutputPixelType(img.GetPixelID() if pixel_type is None else pixel_type)
    return f.Execute(img)


def target_grid(img: sitk.Image, cfg: PreprocessConfig) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(size, spacing) in sitk (x, y, z) order of the preprocessed grid for `img` under `cfg`."""
    n, s = np.array(img.GetSize()), np.array(img.GetSpacing())
    if cfg.spacing is None and cfg.size is None:
        return tuple(int(v) for v in n), tuple(float(v) for v in s)
    if cfg.spacing is None:
        n1 = np.array(cfg.size[::-1])
        return tuple(int(v) for v in n1), tuple(float(v) for v in s * n / n1)
    s1 = np.array(cfg.spacing[::-1], float)
    n1 = np.maximum(np.rint(n * s / s1), 1).astype(int)
    if cfg.size is not None:
        n1 = np.maximum(n1, cfg.size[::-1])
    return tuple(int(v) for v in n1), tuple(float(v) for v in s1)


def preprocess_image(img: sitk.Image, cfg: PreprocessConfig, name: str = "<image>") -> tuple[np.ndarray, sitk.Image]:
    """Reorient -> resample -> window -> scale. Returns float32 [D, H, W] in [0, 1] and the reference grid.

    The reference is the resampled float32 HU image (its geometry is what `preprocess_mask` and
    `to_input_grid` need). `name` (the file path) starts error messages.
    """
    img = reorient(img, cfg.orientation)
    if img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        if not np.isfinite(sitk.GetArrayViewFromImage(img)).all():
            raise VolumeError(f"{name}: contains NaN or infinite voxels; expected finite HU values.")
    if img.GetPixelID() != sitk.sitkFloat32:
        img = sitk.Cast(img, sitk.sitkFloat32)
    size, spacing = target_grid(img, cfg)
    lo, hi = cfg.window
    if size != img.GetSize() or not np.allclose(spacing, img.GetSpacing(), rtol=1e-6, atol=0):
        img = resample_centered(img, size, spacing, INTERPOLATORS[cfg.interpolator], lo, sitk.sitkFloat32)
    arr = (sitk.GetArrayViewFromImage(img) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    np.clip(arr, 0.0, 1.0, out=arr)
    return arr.astype(np.float32, copy=False), img


def _physical_box(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box (min, max corners, mm) of the voxel corners."""
    n = np.array(img.GetSize())
    corners = [img.TransformContinuousIndexToPhysicalPoint([(c >> k & 1) * n[k] - 0.5 for k in range(3)])
               for c in range(8)]
    return np.min(corners, axis=0), np.max(corners, axis=0)


def preprocess_mask(mask: sitk.Image, reference: sitk.Image, name: str = "<mask>",
                    interpolator: str = "nearest") -> np.ndarray:
    """Label map -> int64 [D, H, W] on exactly the reference grid returned by `preprocess_image`."""
    if mask.GetDimension() != 3:
        raise VolumeError(f"{name}: is a {mask.GetDimension()}D label map; expected 3D like its image.")
    (alo, ahi), (blo, bhi) = _physical_box(mask), _physical_box(reference)
    if np.any(ahi <= blo) or np.any(bhi <= alo):
        raise VolumeError(f"{name}: does not overlap its image in physical space; check that the Mask matches Path.")
    ref_orient = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reference.GetDirection())
    mask = reorient(mask, ref_orient)
    same = mask.GetSize() == reference.GetSize() and all(np.allclose(getattr(mask, g)(), getattr(reference, g)(),
        atol=1e-4) for g in ("GetSpacing", "GetOrigin", "GetDirection"))  # noqa: E128
    if not same:
        mask = sitk.Resample(mask, reference, sitk.Transform(), INTERPOLATORS[interpolator], 0.0, mask.GetPixelID())
    arr = sitk.GetArrayViewFromImage(mask)
    if arr.dtype.kind == "f":
        if not np.array_equal(arr, np.round(arr)):
            raise VolumeError(f"{name}: holds non-integer values; expected an integer label map.")
    return arr.astype(np.int64)


def load_volume(path: str, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """Read + preprocess one image: float32 [D, H, W] in [0, 1]."""
    return preprocess_image(read_image(path), cfg or PreprocessConfig(), name=str(path))[0]


def load_volume_and_mask(img_path: str, mask_path: str,
                         cfg: PreprocessConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Image float32 [D, H, W] in [0, 1] and its label map int64 [D, H, W] on the same voxels."""
    cfg = cfg or PreprocessConfig()
    img, ref = preprocess_image(read_image(img_path), cfg, name=str(img_path))
    return img, preprocess_mask(read_image(mask_path), ref, str(mask_path), cfg.mask_interpolator)


def load_cached(path: str, cfg: PreprocessConfig, cache: VolumeCache | None = None, mask_path: str | None = None,
                decoded: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """`load_volume` / `load_volume_and_mask` through an optional VolumeCache: (image, mask or None).

    decoded=False returns cache hits in their stored form (uint16 image, memory-mapped) so that crops and
    flips are views and `util.cache.decode` makes the one float32 copy at the end.
    """
    from pathlib import Path

    keys = [(path, cfg.key(), "image")] + ([(mask_path, cfg.key(), "mask", Path(path))] if mask_path else [])
    if cache is not None:
        got = [cache.get(k, decoded) for k in keys]
        if all(g is not None for g in got):
            return got[0], (got[1] if mask_path else None)
    if mask_path:
        out = load_volume_and_mask(path, mask_path, cfg)
    else:
        out = (load_volume(path, cfg), None)
    if cache is not None:
        for k, a in zip(keys, out):
            cache.put(k, a)
    return out


def to_input_grid(label: np.ndarray, reference: sitk.Image, original: sitk.Image) -> sitk.Image:
    """Label map [D, H, W] on the preprocessed grid -> sitk label image on the original image's grid (nearest)."""
    if tuple(label.shape) != tuple(reference.GetSize()[::-1]):
        raise ValueError(f"to_input_grid: label shape {tuple(label.shape)} does not match the reference grid "
                         f"{tuple(reference.GetSize()[::-1])} (D, H, W).")
    dtype = np.uint8 if label.min() >= 0 and label.max() < 256 else np.int32
    lab = sitk.GetImageFromArray(np.ascontiguousarray(label, dtype=dtype))
    lab.CopyInformation(reference)
    return sitk.Resample(lab, original, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, lab.GetPixelID())


# ------------------------------------------------------------------------------------------- path tables
def where(line: int) -> str:
    """'row R (line L)': R counts data rows from 1 under the header, L is the line in the file."""
    return f"row {line - 1} (line {line})"


def _read_plain_list(data_path: str) -> pd.DataFrame:
    with open(data_path, encoding="utf-8-sig") as f:
        rows = [(i, s.strip()) for i, s in enumerate(f, 1) if s.strip() and not s.lstrip().startswith("#")]
    if rows and rows[0][1] in ("Path", "path"):
        rows = rows[1:]
    return pd.DataFrame({"Path": [p for _, p in rows]}, index=pd.Index([i for i, _ in rows], name="line"))


def _is_plain_list(data_path: str) -> bool:
    ext = os.path.splitext(data_path)[1].lower()
    if ext in (".csv", ".tsv"):
        return False
    if ext in (".txt", ".lst", ".list"):
        return True
    with open(data_path, encoding="utf-8-sig") as f:
        first = next((s.strip() for s in f if s.strip()), "")
    return "," not in first and first not in ("Path", "path")


def read_path_table(data_path: str | os.PathLike, required: Sequence[str] = ("Path",)) -> pd.DataFrame:
    """CSV (or, for `Path` only, a text file with one path per line) -> DataFrame with absolute paths.

    Path (and Mask, when required) values are resolved against the file's folder and must exist. The index
    holds each row's 1-based line number in the file (the header is line 1), used in error messages.
    """
    data_path = os.path.abspath(os.fspath(data_path))
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f"{data_path}: path table not found; expected a CSV with a 'Path' column.")
    if os.path.getsize(data_path) == 0:
        raise ValueError(f"{data_path}: is empty; expected a CSV with a 'Path' column (or one path per line).")
    plain = _is_plain_list(data_path)
    if plain:
        df = _read_plain_list(data_path)
    else:
        df = pd.read_csv(data_path, sep="\t" if data_path.lower().endswith(".tsv") else ",",
                         skip_blank_lines=False, encoding="utf-8-sig")
        df.columns = [str(c).strip() for c in df.columns]
        df.index = pd.RangeIndex(2, len(df) + 2, name="line")
        df = df.dropna(how="all")
        df = df.rename(columns={c.lower(): c for c in ("Path", "Mask") if c not in df.columns})
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{data_path}: has no '{missing[0]}' column (columns: {', '.join(map(str, df.columns))}); "
                         f"expected a header row with {', '.join(required)}.")
    if len(df) == 0:
        raise ValueError(f"{data_path}: has no data rows; expected one row per volume.")
    folder = os.path.dirname(data_path)
    for col in [c for c in ("Path", "Mask") if c in required]:
        df[col] = [_resolve_cell(v, folder, data_path, line, col, plain) for line, v in df[col].items()]
        gone = [(line, p) for line, p in df[col].items() if not os.path.exists(p)]
        if gone:
            at = f"line {gone[0][0]}" if plain else where(gone[0][0])
            more = f" (and {len(gone) - 1} more rows)" if len(gone) > 1 else ""
            raise FileNotFoundError(f"{data_path}: {at}, column {col}: {gone[0][1]} does not exist{more}; "
                                    f"relative paths are resolved against the file's folder.")
    dup = df["Path"].duplicated()
    if dup.any():
        warnings.warn(f"{data_path}: {int(dup.sum())} duplicated paths (first: {df['Path'][dup].iloc[0]}).")
    return df


def _resolve_cell(value, folder: str, data_path: str, line: int, col: str, plain: bool) -> str:
    if not isinstance(value, str) or not value.strip():
        at = f"line {line}" if plain else where(line)
        raise ValueError(f"{data_path}: {at} has an empty '{col}' value; expected a file path.")
    p = os.path.expanduser(value.strip())
    return os.path.normpath(p if os.path.isabs(p) else os.path.join(folder, p))


# ------------------------------------------------------------------------------------------ augmentation
class Augment3D:
    """Random flips along `flip_axes` of [D, H, W] arrays (+ optional intensity jitter of the image only).

    The same draws flip image and mask, so their voxels stay paired. Returns a C-contiguous float32 image
    (uint16 cache entries are decoded here) and a C-contiguous mask.
    """

    def __init__(self, flip_axes: Sequence[int] = (0, 1, 2), flip_prob: float = 0.5,
                 intensity_jitter: float = 0.0) -> None:
        self.flip_axes, self.flip_prob, self.intensity_jitter = tuple(flip_axes), flip_prob, intensity_jitter

    def __call__(self, img: np.ndarray, mask: np.ndarray | None = None,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        rng = rng if rng is not None else np.random.default_rng()
        axes = tuple(a for a in self.flip_axes if rng.random() < self.flip_prob)
        if axes:
            img = np.flip(img, axes)
            mask = None if mask is None else np.flip(mask, axes)
        img = np.ascontiguousarray(decode(img), dtype=np.float32)  # the one copy (float32, C order)
        if self.intensity_jitter > 0:
            scale, shift = 1 + rng.uniform(-1, 1, 2) * self.intensity_jitter
            img = np.clip(img * np.float32(scale) + np.float32(shift - 1), 0, 1)
        return img, None if mask is None else np.ascontiguousarray(mask)


def _pad_to(a: np.ndarray, size: Sequence[int], value: float) -> np.ndarray:
    pad = [max(s - n, 0) for n, s in zip(a.shape, size)]
    if not any(pad):
        return a
    return np.pad(a, [(p // 2, p - p // 2) for p in pad], constant_values=value)


def center_crop_or_pad(array: np.ndarray, size: Sequence[int], pad_value: float = 0.0) -> np.ndarray:
    """[D, H, W] -> exactly `size`: centre crop larger axes, centre pad smaller ones with pad_value."""
    a = _pad_to(array, size, pad_value)
    start = [(n - s) // 2 for n, s in zip(a.shape, size)]
    return a[tuple(slice(b, b + s) for b, s in zip(start, size))]


def random_crop(arrays: Sequence[np.ndarray], size: Sequence[int], rng: np.random.Generator,
                fg_mask: np.ndarray | None = None, fg_prob: float = 0.0) -> list[np.ndarray]:
    """Same random `size` crop of every [D, H, W] array (padded with 0 first when smaller).

    With probability fg_prob (and a non-empty fg_mask) the crop contains a random foreground voxel.
    """
    arrays = [_pad_to(a, size, 0) for a in arrays]
    shape = arrays[0].shape
    hi = [n - s for n, s in zip(shape, size)]
    start = [int(rng.integers(0, h + 1)) for h in hi]
    if fg_mask is not None and fg_prob > 0 and rng.random() < fg_prob:
        fg = np.flatnonzero(_pad_to(fg_mask, size, 0) > 0)
        if fg.size:
            c = np.unravel_index(fg[rng.integers(fg.size)], shape)
            start = [int(rng.integers(max(0, ci - s + 1), min(ci, h) + 1)) for ci, s, h in zip(c, size, hi)]
    return [a[tuple(slice(b, b + s) for b, s in zip(start, size))] for a in arrays]


def limit_sitk_threads() -> None:
    """Inside a DataLoader worker, share the cores between workers instead of oversubscribing them."""
    info = torch.utils.data.get_worker_info()
    if info is not None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, cores // info.num_workers))


# ------------------------------------------------------------------------------------------------ dataset
class Custom3DDataset(Dataset):
    """Pretraining volumes from a CSV (`Path` column) or a text list. Items: (float32 [1, D, H, W] in [0, 1], i).

    Adapt this class to your data. Training: random crop (when the preprocessed volume is larger than
    input_size) + random flips (+ jitter), drawn from np.random.default_rng([seed, epoch, i]) so batches do not
    depend on the number of workers. Eval: centre crop / pad. With skip_bad a bad volume is logged, recorded in
    `bad_files` (per process) and replaced by the next readable index.
    """

    def __init__(self, data_path: str, input_size=256, train: bool = True,
                 preprocess: PreprocessConfig | None = None, cache_dir: str | None = None, seed: int = 0,
                 skip_bad: bool = False, intensity_jitter: float = 0.0) -> None:
        self.input_size = _triple(input_size, "Custom3DDataset input_size")
        self.cfg = preprocess if preprocess is not None else PreprocessConfig(size=self.input_size)
        self.table = read_path_table(data_path)
        self.paths: list[str] = list(self.table["Path"])
        self.train, self.seed, self.skip_bad, self.epoch = train, seed, skip_bad, 0
        self.cache = VolumeCache(cache_dir) if cache_dir else None
        self.augment = Augment3D(intensity_jitter=intensity_jitter)
        self.bad_files: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _load(self, index: int) -> np.ndarray:
        for k in range(len(self.paths)):
            path = self.paths[(index + k) % len(self.paths)]
            try:
                return load_cached(path, self.cfg, self.cache, decoded=False)[0]
            except (VolumeError, OSError) as e:
                if not self.skip_bad:
                    raise
                log.warning("skipping bad volume: %s", e)
                if path not in self.bad_files:
                    self.bad_files.append(path)
        raise RuntimeError("Custom3DDataset: every volume failed to load (see the warnings above).")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        limit_sitk_threads()
        img = self._load(index)  # float32, or uint16 straight from the cache
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            img = random_crop([img], self.input_size, rng)[0]
            img, _ = self.augment(img, None, rng)
        else:
            img = decode(center_crop_or_pad(img, self.input_size, 0.0))
        return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None], index
