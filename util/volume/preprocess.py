"""Preprocessing of CT volumes: one function configured by one `PreprocessConfig`, used by every script.

read (util.volume.io) -> reorient to `orientation` -> resample (whole volume to `size` keeping its physical
extent, or to `spacing` then pad to >= `size`) -> clip to the HU `window` and scale to [0, 1] float32 [D, H, W].
Axis-aligned resampling of images (B-spline, linear) uses the separable resampler in util.volume.resample; SimpleITK
stays the reference and serves label maps and everything else.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from util.volume.cache import QMAX, VolumeCache, decode, encode, file_stamp
from util.volume.resample import geometry_of, resample_centered, resample_centered_array, resample_sitk
from util.volume.roi import extract_roi, label_centroid, to_lps
from util.volume.io import VolumeError, read_image
from util.volume.preprocess_config import (CACHE_KEY_WINDOW, INTERPOLATORS, PREPROCESS_VERSION,  # noqa: F401
                                           ROI_FIELDS, PreprocessConfig)

def reorient(img: sitk.Image, orientation: str = "LPS") -> sitk.Image:
    """Permute/flip the axes so they point to `orientation` (DICOM letters); the physical image is unchanged."""
    current = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())
    return img if current == orientation else sitk.DICOMOrient(img, orientation)


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


def preprocess_image(img: sitk.Image, cfg: PreprocessConfig, name: str = "<image>",
                     backend: str = "auto") -> tuple[np.ndarray, sitk.Image]:
    """Reorient -> resample -> window -> scale. Returns float32 [D, H, W] in [0, 1] and the reference grid.

    The reference is an image on the preprocessed grid: its geometry is what `preprocess_mask` and `to_input_grid`
    need (its voxels are not the image's). `name` (the file path) starts error messages. backend: "auto" uses the
    separable resampler of util.volume.resample where it applies, "sitk" always SimpleITK (the reference).
    """
    img = reorient(img, cfg.orientation)
    warn_if_not_hu(img, name)
    arr, ref = resample_raw(img, cfg, cfg.window[0], name, backend)
    return apply_window(arr, cfg.window), ref


def resample_raw(img: sitk.Image, cfg: PreprocessConfig, fill: float, name: str = "<image>",
                 backend: str = "auto") -> tuple[np.ndarray, sitk.Image]:
    """A reoriented image resampled onto its preprocessed grid, intensities as stored (HU for CT), `fill` outside
    it: (float32 [D, H, W], the reference grid), checked finite."""
    if img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        if not np.isfinite(sitk.GetArrayViewFromImage(img)).all():
            raise VolumeError(f"{name}: contains NaN or infinite voxels; expected finite values.")
    size, spacing = target_grid(img, cfg)
    done = None
    if size != img.GetSize() or not np.allclose(spacing, img.GetSpacing(), rtol=1e-6, atol=0):
        if backend == "auto":  # straight from the stored pixel type into float32 [D, H, W]
            done = resample_centered_array(img, size, spacing, cfg.interpolator, fill)
        if done is None:
            img = resample_centered(_float32(img), size, spacing, cfg.interpolator, fill, sitk.sitkFloat32,
                                    backend="sitk")
    if done is None:
        img = _float32(img)
        done = sitk.GetArrayFromImage(img), img
    arr, ref = done
    return finite_output(arr, name), ref


NOT_HU_BELOW = -500.0  # a CT scan has air (-1000 HU) around the body; a volume with no voxel below this is not HU
_WARNED_NOT_HU: set = set()


def warn_if_not_hu(img: sitk.Image, name: str) -> None:
    """Warn (once per process) when a volume given a CT window has no voxel below NOT_HU_BELOW HU: an MRI or an
    already normalised image, which a HU window would flatten (pass --norm zscore or percentile for it)."""
    if _WARNED_NOT_HU:
        return
    arr = sitk.GetArrayViewFromImage(img)[::2, ::4, ::4]  # every 32nd voxel: air is never a few voxels
    if arr.size and float(arr.min()) >= NOT_HU_BELOW:
        _WARNED_NOT_HU.add(name)
        warnings.warn(f"{name}: has no voxel below {NOT_HU_BELOW:g} HU (minimum {float(arr.min()):g}), so it does "
                      f"not look like a CT in HU, yet a CT window is applied to it; for MRI or other images pass "
                      f"--norm zscore or --norm percentile for its channel (said once per run).")


def finite_output(arr: np.ndarray, name: str) -> np.ndarray:
    """The last check of every preprocessed array (HU, before windowing, which would hide an infinity): a NaN or
    infinite value is never fed to a model or a cache; one sentence names the file."""
    if not np.isfinite(arr).all():
        raise VolumeError(f"{name}: preprocessing produced {int((~np.isfinite(arr)).sum()):,} NaN or infinite "
                          f"values of {arr.size:,}; this is a bug, please report it with the file's size and spacing.")
    return arr


def apply_window(arr: np.ndarray, window) -> np.ndarray:
    """HU float32 array -> clipped to the window and scaled to [0, 1], in place (returns it)."""
    lo, hi = window
    arr -= np.float32(lo)
    arr *= np.float32(1.0 / (hi - lo))
    np.clip(arr, 0.0, 1.0, out=arr)
    return arr


def _float32(img: sitk.Image) -> sitk.Image:
    return img if img.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(img, sitk.sitkFloat32)


def _physical_box(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box (min, max corners, mm) of the voxel corners."""
    n = np.array(img.GetSize())
    corners = [img.TransformContinuousIndexToPhysicalPoint([(c >> k & 1) * n[k] - 0.5 for k in range(3)])
               for c in range(8)]
    return np.min(corners, axis=0), np.max(corners, axis=0)


def same_grid(a: sitk.Image, b: sitk.Image, atol: float = 1e-4) -> bool:
    """True when two images share size, spacing, origin and direction (up to `atol`)."""
    return a.GetSize() == b.GetSize() and all(np.allclose(getattr(a, g)(), getattr(b, g)(), atol=atol)
                                              for g in ("GetSpacing", "GetOrigin", "GetDirection"))


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
    if not same_grid(mask, reference):
        mask = resample_sitk(mask, reference.GetSize(), geometry_of(reference), interpolator, 0.0)
    arr = sitk.GetArrayViewFromImage(mask)
    if arr.dtype.kind == "f":
        if not np.array_equal(arr, np.round(arr)):
            raise VolumeError(f"{name}: holds non-integer values; expected an integer label map.")
    return arr.astype(np.int64)


def load_volume_and_mask_grid(mask_path: str, reference: sitk.Image, cfg: PreprocessConfig) -> np.ndarray:
    """The label map of `mask_path` on the reference grid of a row's (first) image: int64 [D, H, W]."""
    return preprocess_mask(read_image(mask_path), reference, str(mask_path), cfg.mask_interpolator)


def load_volume(path: str, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """Read + preprocess one image: float32 [D, H, W] in [0, 1]."""
    return preprocess_image(read_image(path), cfg or PreprocessConfig(), name=str(path))[0]


def load_volume_and_mask(img_path: str, mask_path: str,
                         cfg: PreprocessConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Image float32 [D, H, W] in [0, 1] and its label map int64 [D, H, W] on the same voxels."""
    cfg = cfg or PreprocessConfig()
    img, ref = preprocess_image(read_image(img_path), cfg, name=str(img_path))
    return img, preprocess_mask(read_image(mask_path), ref, str(mask_path), cfg.mask_interpolator)


def cache_keys(path: str, cfg: PreprocessConfig, mask_path: str | None = None, roi=None) -> list[tuple]:
    """VolumeCache keys of an image (and of its label map, which depends on the image's grid too); with ROI
    settings, the one key of the row's box, which names its centre (a point, or the mask file it comes from). The
    HU window is not part of them: the cache stores HU and applies the window when read."""
    key = dataclasses.replace(cfg, window=CACHE_KEY_WINDOW).key()
    if cfg.roi:
        where = Path(roi) if isinstance(roi, str) else ",".join(f"{float(v):.3f}" for v in roi)
        return [(path, key, "roi", where)]
    keys = [(path, key, "image")]
    return keys + [(mask_path, key, "mask", Path(path))] if mask_path else keys


def load_cached(path: str, cfg: PreprocessConfig, cache: VolumeCache | None = None, mask_path: str | None = None,
                decoded: bool = True, roi=None, deltas: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """`load_volume` / `load_volume_and_mask` (or, with ROI settings, `load_roi` of the row's `roi`) through an
    optional VolumeCache: (image, mask or None).

    The cache holds the image in HU (preprocessed with the cache's HU range as window) and `cfg.window` is applied
    when it is read, so one entry serves every window. decoded=False (with a cache) returns the stored form (uint16
    levels; `util.volume.cache.decode` with `cache.window_map(cfg.window)`, or the training device, makes the one
    float copy at the end). With a cache, a miss returns the numbers a later hit returns (the quantised image).
    deltas=True (with decoded=False): a hit's image may be a `util.volume.cache.SliceDeltas` (VolumeCache.get).
    """
    if cfg.roi:
        if roi is None:
            raise ValueError("load_cached: ROI preprocessing needs the row's point or mask (roi=...).")
        mask_path = None
    keys = cache_keys(path, cfg, mask_path, roi)
    window_map = cache.window_map(cfg.window) if cache is not None else None  # a window the cache cannot hold: refused
    if cache is not None:
        got = [cache.get(k, deltas=deltas and not decoded and i == 0) for i, k in enumerate(keys)]
        if all(g is not None for g in got):
            return (decode(got[0], window_map) if decoded else got[0]), (got[1] if mask_path else None)
    work = cfg if cache is None else dataclasses.replace(cfg, window=cache.settings.hu_range())  # HU, unclipped
    if cfg.roi:
        out = (load_roi(path, roi, work), None)
    else:
        out = load_volume_and_mask(path, mask_path, work) if mask_path else (load_volume(path, work), None)
    if cache is None:
        return out
    stored = [encode(a, QMAX if k == 0 else None) for k, a in enumerate(out[:len(keys)])]  # image, then mask
    for k, (key, a) in enumerate(zip(keys, stored)):
        cache.put_stored(key, a, QMAX if k == 0 else 0)
    image = decode(stored[0], window_map) if decoded else stored[0]  # the numbers a later hit gives
    return image, (out[1] if decoded and mask_path else stored[1] if mask_path else None)


_SCANS: OrderedDict = OrderedDict()  # path -> (file stamp, image): the scans this process read last
SCANS_KEPT = 2  # an image and its mask


def read_scan(path: str) -> sitk.Image:
    """`read_image` that remembers the last SCANS_KEPT files this process read (checked against their stamp), so
    consecutive rows on one scan (lesions, points) read it once."""
    path = str(path)
    try:
        stamp = file_stamp(path)
    except OSError:
        return read_image(path)  # the reader names the missing file
    hit = _SCANS.get(path)
    if hit is not None and hit[0] == stamp:
        _SCANS.move_to_end(path)
        return hit[1]
    img = read_image(path)
    _SCANS[path] = (stamp, img)
    while len(_SCANS) > SCANS_KEPT:
        _SCANS.popitem(last=False)
    return img


def roi_center(roi, cfg: PreprocessConfig) -> np.ndarray:
    """The LPS centre of a row: its point (x, y, z) in cfg.roi_coords, or the centroid of cfg.roi_label in the mask
    file `roi` (a str)."""
    if isinstance(roi, str):
        return label_centroid(read_scan(roi), cfg.roi_label, roi)
    return to_lps(roi, cfg.roi_coords)


def preprocess_roi(img: sitk.Image, center_lps, cfg: PreprocessConfig, name: str = "<image>") -> np.ndarray:
    """The box of cfg.roi_mm around the LPS point, resampled to cfg.size (axes along cfg.orientation), air (the
    window's low end) outside the scan, windowed as `preprocess_image`: float32 [D, H, W] in [0, 1]."""
    warn_if_not_hu(img, name)
    arr = extract_roi(img, center_lps, cfg.roi_mm, cfg.size, cfg.orientation, cfg.interpolator, cfg.window[0], name)
    return apply_window(finite_output(arr, name), cfg.window)


def load_roi(path: str, roi, cfg: PreprocessConfig) -> np.ndarray:
    """Read (once for consecutive rows of one scan) + the box of one row (`roi`: point or mask path)."""
    return preprocess_roi(read_scan(path), roi_center(roi, cfg), cfg, name=str(path))


def to_input_grid(label: np.ndarray, reference: sitk.Image, original: sitk.Image) -> sitk.Image:
    """Label map [D, H, W] on the preprocessed grid -> sitk label image on the original image's grid (nearest)."""
    if tuple(label.shape) != tuple(reference.GetSize()[::-1]):
        raise ValueError(f"to_input_grid: label shape {tuple(label.shape)} does not match the reference grid "
                         f"{tuple(reference.GetSize()[::-1])} (D, H, W).")
    dtype = np.uint8 if label.min() >= 0 and label.max() < 256 else np.int32
    lab = sitk.GetImageFromArray(np.ascontiguousarray(label, dtype=dtype))
    lab.CopyInformation(reference)
    return resample_sitk(lab, original.GetSize(), geometry_of(original), "nearest", 0.0)
