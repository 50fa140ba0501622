"""Several co-registered images per row, one per channel (MRI sequences, several CT windows): each read, put on the
first channel's grid in physical space and normalised as its `norm` says (util.volume.preprocess_config).

Normalisation statistics are those of the file's own voxels (its resolution, before resampling; nnU-Net normalises
before resampling too): `zscore` subtracts the mean and divides by the standard deviation of the non-zero voxels
(all voxels when none is zero), `percentile` clips to the 0.5 and 99.5 percentiles of the non-zero voxels and
scales that range to [0, 1], `ct` clips to the HU window and scales it to [0, 1]. Each is an affine map, which
resampling (B-spline, linear: weights summing to 1) commutes with, so the order does not matter but for the fill
outside the image (the background: 0 before normalising, the window's low end for CT).

Grids: a channel whose grid equals the first channel's within GRID_TOLERANCE (size equal; spacing and origin within
1e-3 mm, direction cosines within 1e-4: co-registered BraTS-style files) is taken voxel for voxel; any other grid
is resampled onto the first channel's preprocessed grid in physical space (--interpolator), provided its physical box
covers at least CHANNEL_COVERAGE (90%) of the first channel's box; less (or no overlap) is the row's error.

Cache: a ct channel's entry holds HU levels, its window applied when read (on the first channel's file: exactly the
single-channel CT entry of that file, shared with CT runs and between windows); a zscore channel holds z in levels
of 1/1024 (range -32..32 standard deviations), a percentile channel its [0, 1] values at 65535 levels. `level_maps`
gives, per channel, (offset, factor, low, high): value = clip((level - offset) * factor, low, high), what
util.volume.cache.decode and the training device compute.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from util.errors import UserError
from util.volume.cache import HU_ZERO, QMAX, VolumeCache, decode, encode
from util.volume.io import VolumeError, read_volumes
from util.volume.preprocess import (PreprocessConfig, _physical_box, cache_keys, finite_output, load_cached,
                                    load_volume_and_mask_grid, read_scan, reorient, resample_raw, roi_center,
                                    warn_if_not_hu)
from util.volume.preprocess_config import PERCENTILES
from util.volume.resample import geometry_of, resample_sitk
from util.volume.roi import extract_roi

GRID_TOLERANCE = 1e-3  # mm (spacing, origin); direction cosines: 1e-4
CHANNEL_COVERAGE = 0.9  # share of the first channel's physical box another channel must cover
ZSCORE_LEVELS = 1024.0  # cache levels per standard deviation of a zscore channel
ZSCORE_RANGE = (-32.0, 32.0)  # what a zscore channel's cache entry holds (values beyond are clipped)


@dataclass(frozen=True)
class ChannelSource:
    """Where one channel of a row is: a 3D file, or volume `index` (0-based) of a 4D file."""
    path: str
    index: int | None = None
    volumes: int = 1  # how many volumes the 4D file holds (its channels)

    def __str__(self) -> str:
        return self.path if self.index is None else f"{self.path} (volume {self.index + 1} of {self.volumes})"


def read_channel(src: ChannelSource) -> sitk.Image:
    """The 3D image of one channel, as stored (not reoriented)."""
    return _read(src)


def _read(src: ChannelSource) -> sitk.Image:
    if src.index is None:
        return read_scan(src.path)
    return _read_4d(src.path, src.volumes)[src.index]


_LAST_4D: list = []  # [(path, volumes, images)]: the 4D file this process read last (its channels are read in a row)


def _read_4d(path: str, volumes: int) -> list[sitk.Image]:
    from util.volume.cache import file_stamp

    stamp = file_stamp(path)
    if _LAST_4D and _LAST_4D[0][:2] == (stamp, volumes):
        return _LAST_4D[0][2]
    images = read_volumes(path, volumes)
    _LAST_4D[:] = [(stamp, volumes, images)]
    return images


def norm_affine(img: sitk.Image, kind: str, name: str) -> tuple[float, float, float, float]:
    """(shift, scale, low, high) of a zscore or percentile channel: value = clip((x - shift) * scale, low, high),
    from the statistics of the image's own voxels (module doc)."""
    arr = sitk.GetArrayViewFromImage(img)
    fg = arr[arr != 0]
    fg = fg if fg.size else arr.reshape(-1)
    if kind == "zscore":
        mean, std = float(np.mean(fg, dtype=np.float64)), float(np.std(fg, dtype=np.float64))
        if not std > 0:
            raise VolumeError(f"{name}: has one intensity ({mean:g}) in all its non-zero voxels; zscore needs "
                              f"an image whose voxels vary.")
        return mean, 1.0 / std, -np.inf, np.inf
    lo, hi = (float(v) for v in np.percentile(fg, PERCENTILES))
    if not hi > lo:
        raise VolumeError(f"{name}: its {PERCENTILES[0]:g} and {PERCENTILES[1]:g} percentiles are equal ({lo:g}); "
                          f"percentile normalisation needs an image whose voxels vary.")
    return lo, 1.0 / (hi - lo), 0.0, 1.0


def normalise(arr: np.ndarray, affine) -> np.ndarray:
    """clip((arr - shift) * scale, low, high) in float32, in place (returns arr)."""
    shift, scale, lo, hi = affine
    arr -= np.float32(shift)
    arr *= np.float32(scale)
    if np.isfinite(lo) or np.isfinite(hi):
        np.clip(arr, np.float32(lo), np.float32(hi), out=arr)
    return arr


def _check_cover(img: sitk.Image, first: sitk.Image, name: str, first_name: str) -> None:
    (alo, ahi), (blo, bhi) = _physical_box(img), _physical_box(first)
    inter = np.clip(np.minimum(ahi, bhi) - np.maximum(alo, blo), 0, None)
    share = float(np.prod(inter) / np.prod(bhi - blo))
    if share <= 0:
        raise VolumeError(f"{name}: does not overlap the row's first channel {first_name} in physical space; "
                          f"the channels of a row must be co-registered images of one study.")
    if share < CHANNEL_COVERAGE:
        raise VolumeError(f"{name}: covers {share:.0%} of the field of view of the row's first channel {first_name}, "
                          f"less than the {CHANNEL_COVERAGE:.0%} a co-registered channel must cover.")


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return a.GetSize() == b.GetSize() and all(
        np.allclose(getattr(a, g)(), getattr(b, g)(), rtol=0, atol=GRID_TOLERANCE) for g in ("GetSpacing", "GetOrigin")
    ) and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-4)


def _fill(cfg: PreprocessConfig, c: int, hu_range=None) -> float:
    if cfg.norm[c] != "ct":
        return 0.0
    return (hu_range or cfg.channel_window(c))[0]


def raw_channels(sources, cfg: PreprocessConfig, hu_range=None, backend: str = "auto", roi=None
                 ) -> tuple[list[np.ndarray], list, sitk.Image | None]:
    """Each channel on the row's grid before normalisation (HU for ct channels, `hu_range`'s low end or the
    window's outside; 0 outside for the others), float32 [D, H, W]; the zscore/percentile affines (None for ct);
    the reference grid (None for an ROI box). roi: the row's point or Mask path (lesion-level rows)."""
    images = [reorient(_read(s), cfg.orientation) for s in sources]
    names = [str(s) for s in sources]
    first = images[0]
    center = roi_center(roi, cfg) if cfg.roi else None
    out, affines, ref = [], [], None
    for c, (img, name) in enumerate(zip(images, names)):
        kind = cfg.norm[c]
        if kind == "ct":
            warn_if_not_hu(img, name)
            affines.append(None)
        else:
            affines.append(norm_affine(img, kind, name))
        fill = _fill(cfg, c, hu_range)
        if cfg.roi:  # every channel's own box around the point, in physical space
            arr = extract_roi(img, center, cfg.roi_mm, cfg.size, cfg.orientation, cfg.interpolator, fill, name)
            out.append(finite_output(arr, name))
            continue
        if c > 0 and not _same_grid(img, first):
            _check_cover(img, first, name, names[0])
            moved = resample_sitk(sitk.Cast(img, sitk.sitkFloat32), ref.GetSize(), geometry_of(ref),
                                  cfg.interpolator, fill, sitk.sitkFloat32)
            out.append(finite_output(sitk.GetArrayFromImage(moved), name))
            continue
        if c > 0:  # the same grid: the same resampling as the first channel, voxel for voxel
            img = sitk.Image(img)
            img.CopyInformation(first)
        arr, grid = resample_raw(img, cfg, fill, name, backend)
        ref = grid if c == 0 else ref
        out.append(arr)
    return out, affines, ref


def preprocess_channels(sources, cfg: PreprocessConfig, backend: str = "auto", roi=None
                        ) -> tuple[np.ndarray, sitk.Image | None]:
    """A row's channels preprocessed: float32 [C, D, H, W] (ct channels in [0, 1], percentile in [0, 1], zscore
    unbounded) and the reference grid of the first channel (None for an ROI box)."""
    raws, affines, ref = raw_channels(sources, cfg, None, backend, roi)
    for c, (arr, aff) in enumerate(zip(raws, affines)):
        if aff is None:
            lo, hi = cfg.channel_window(c)
            aff = (lo, 1.0 / (hi - lo), 0.0, 1.0)
        normalise(arr, aff)
    return np.stack(raws), ref


# --- the cache ------------------------------------------------------------------------------------------------------
def level_maps(cfg: PreprocessConfig, cache: VolumeCache | None) -> np.ndarray:
    """float32 [C, 4]: per channel (offset, factor, low, high) from its cache levels to its values (module doc)."""
    rows = []
    for c, kind in enumerate(cfg.norm):
        if kind == "ct":
            offset, factor = cache.window_map(cfg.channel_window(c)) if cache is not None else (0.0, 1.0 / QMAX)
            rows.append((offset, factor, 0.0, 1.0))
        elif kind == "percentile":
            rows.append((0.0, 1.0 / QMAX, 0.0, 1.0))
        else:
            rows.append((float(HU_ZERO), 1.0 / ZSCORE_LEVELS, *ZSCORE_RANGE))
    return np.asarray(rows, dtype=np.float32)


def channel_keys(sources, cfg: PreprocessConfig, mask_path: str | None = None, roi=None) -> list[tuple]:
    """VolumeCache keys of a row: one per channel (ct channels: the single-channel key of their file, so entries
    are shared with CT runs; a channel on another file than the first also stamps the first, whose grid it is
    resampled onto), then the label map's (on the first channel's grid)."""
    first = sources[0]
    keys = []
    for c, src in enumerate(sources):
        key = (src.path, cfg.channel_key(c))
        where = ("roi", Path(roi) if isinstance(roi, str) else ",".join(f"{float(v):.3f}" for v in roi)) \
            if cfg.roi else ("image",)
        key += where + ((f"volume {src.index} of {src.volumes}",) if src.index is not None else ())
        if c > 0 and src.path != first.path and not cfg.roi:
            key += (Path(first.path),)
        keys.append(key)
    if mask_path and not cfg.roi:
        keys.append((mask_path, cfg.channel_key(0), "mask", Path(first.path)))
    return keys


def _stored(arr: np.ndarray, kind: str) -> np.ndarray:
    """A channel's cache entry (uint16 levels) from its HU (ct) or normalised values."""
    if kind == "ct":
        return encode(arr, QMAX)  # arr holds the cache's HU range windowed to [0, 1], as the single-channel entry
    if kind == "percentile":
        return encode(arr, QMAX)
    q = np.rint(np.clip(arr, *ZSCORE_RANGE) * np.float32(ZSCORE_LEVELS)) + np.float32(HU_ZERO)
    return np.clip(q, 0, QMAX).astype(np.uint16)


def load_cached_channels(sources, cfg: PreprocessConfig, cache: VolumeCache | None = None,
                         mask_path: str | None = None, decoded: bool = True, roi=None
                         ) -> tuple[np.ndarray, np.ndarray | None]:
    """`util.volume.preprocess.load_cached` for a row of several channels: (image [C, D, H, W], mask or None).
    decoded=False (with a cache): the stored uint16 levels, turned into values by `level_maps` (on the device)."""
    if cfg.roi:
        mask_path = None
    if cache is None:
        img, ref = preprocess_channels(sources, cfg, roi=roi)
        return img, (load_volume_and_mask_grid(mask_path, ref, cfg) if mask_path else None)
    maps = level_maps(cfg, cache)
    keys = channel_keys(sources, cfg, mask_path, roi)
    read = {k: cache.get(k) for k in dict.fromkeys(keys)}  # channels of one entry (CT windows of a file): read once
    got = [read[k] for k in keys]
    if all(g is not None for g in got):
        stored = np.stack(got[:len(sources)])
        return (decode(stored, maps) if decoded else stored), (got[-1] if mask_path else None)
    work = dataclasses.replace(cfg, window=cache.settings.hu_range(), windows=None)
    raws, affines, ref = raw_channels(sources, cfg, cache.settings.hu_range(), roi=roi)
    stored = []
    for c, (arr, aff) in enumerate(zip(raws, affines)):
        if aff is None:
            lo, hi = work.window
            aff = (lo, 1.0 / (hi - lo), 0.0, 1.0)
        stored.append(_stored(normalise(arr, aff), cfg.norm[c]))
    for key, s in dict(zip(keys, stored)).items():
        cache.put_stored(key, s, QMAX)
    mask = None
    if mask_path:
        mask = encode(load_volume_and_mask_grid(mask_path, ref, cfg))
        cache.put_stored(keys[-1], mask, 0)
    image = np.stack(stored)
    return (decode(image, maps) if decoded else image), mask


def row_keys(row, cfg: PreprocessConfig, mask_path: str | None = None, roi=None) -> list[tuple]:
    """The VolumeCache keys of a row (its Path, or its ChannelSource tuple; see `load_row`)."""
    if isinstance(row, str):
        return cache_keys(row, cfg, mask_path, roi)
    return channel_keys(row, cfg, mask_path, roi)


def load_row(row, cfg: PreprocessConfig, cache: VolumeCache | None = None, mask_path: str | None = None,
             decoded: bool = True, roi=None, deltas: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """A row's preprocessed image through the optional cache, whatever its channels: `row` is the Path (str) of a
    plain single-channel CT configuration (util.volume.preprocess.load_cached: [D, H, W]) or the row's
    ChannelSource tuple (`load_cached_channels`: [C, D, H, W])."""
    if isinstance(row, str):
        return load_cached(row, cfg, cache, mask_path, decoded, roi, deltas)
    return load_cached_channels(row, cfg, cache, mask_path, decoded, roi)


def check_bounded(cfg: PreprocessConfig, what: str) -> None:
    """Refuse `what` (a flag that assumes values in [0, 1]) for a configuration with a zscore channel."""
    if not cfg.bounded:
        names = [n for n, k in zip(cfg.channel_names, cfg.norm) if k == "zscore"]
        raise UserError(f"{what} needs every channel in [0, 1], but zscore channels ({', '.join(names)}) are not; "
                        f"use --norm percentile for them or leave {what.split()[0]} out.")
