"""What the model was fed, row by row, for a person to look at: the preprocessed input of a table row as a NIfTI
file on its own geometry (it overlays the scan in any viewer; a lesion box sits where the point is) and a PNG
montage of its three orthogonal mid-slices, both named after the row.

    save_input(folder, row, path, arr, cfg, roi)   # row counted from 1 under the header, as every message counts

Used by `main_predict.py --save_inputs DIR`; written so that any script that preprocesses rows (main_cache.py)
can call it with what it already has: the row, its file, the array it produced, the PreprocessConfig and the row's
ROI (point or mask path, None for whole volumes).
"""
from __future__ import annotations

import os
import re

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

from util.atomic import atomic_write
from util.volume.preprocess import PreprocessConfig, read_scan, reorient, roi_center, target_grid
from util.volume.roi import roi_grid

CELL = 192                      # pixels per slice in the montage
BACKGROUND, TEXT = (24, 24, 48), (255, 255, 255)


def input_names(folder: str, row: int, path: str) -> tuple[str, str]:
    """(`rowNNNN_<scan>.nii.gz`, `rowNNNN_<scan>.png`) in `folder`; NNNN is the row counted from 1."""
    stem = re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.mhd)$", "", os.path.basename(os.path.normpath(str(path))))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "scan"
    base = os.path.join(folder, f"row{row:04d}_{stem}")
    return base + ".nii.gz", base + ".png"


def input_geometry(path: str, cfg: PreprocessConfig, roi, shape) -> sitk.Image:
    """An empty image on the grid of the array the model was fed, of `shape` (D, H, W): the lesion box of the row
    (`roi`: its point or Mask), or the whole scan resampled as preprocessing does (same physical centre, axes
    along cfg.orientation), then centre-cropped or padded to `shape` as the evaluation crop is."""
    if cfg.roi:
        return roi_grid(roi_center(roi, cfg), cfg.roi_mm, cfg.size, cfg.orientation)
    img = reorient(read_scan(path), cfg.orientation)
    size, spacing = target_grid(img, cfg)
    n0, s0 = np.array(img.GetSize(), float), np.array(img.GetSpacing())
    direction = np.array(img.GetDirection()).reshape(3, 3)
    centre = np.array(img.GetOrigin()) + direction @ (s0 * (n0 - 1) / 2)
    n1, s1 = np.array(size, float), np.array(spacing)
    origin = centre - direction @ (s1 * (n1 - 1) / 2)
    # the crop/pad to `shape`: voxel i of the output is voxel i + offset of the resampled grid (numpy order D, H, W)
    grid = np.array(size[::-1])
    pad = np.maximum(np.array(shape) - grid, 0)
    offset = (np.maximum(grid, shape) - np.array(shape)) // 2 - pad // 2
    origin = origin + direction @ (s1 * offset[::-1])
    ref = sitk.Image([int(v) for v in shape[::-1]], sitk.sitkUInt8)
    ref.SetSpacing([float(v) for v in s1])
    ref.SetDirection([float(v) for v in direction.reshape(-1)])
    ref.SetOrigin([float(v) for v in origin])
    return ref


def montage(vol: np.ndarray, title: str) -> np.ndarray:
    """Axial, coronal and sagittal mid-slices of a [D, H, W] volume in [0, 1] side by side (coronal and sagittal
    with the last depth index, superior in LPS arrays, at the top), under a title: uint8 [h, w, 3]."""
    d, h, w = vol.shape
    slices = [vol[d // 2], vol[::-1, h // 2, :], vol[::-1, :, w // 2]]
    cells = []
    for sl, name in zip(slices, ("axial", "coronal", "sagittal")):
        grey = np.clip(np.nan_to_num(sl, nan=0.0) * 255, 0, 255).astype(np.uint8)
        scale = CELL / max(grey.shape)
        rows = np.minimum((np.arange(max(1, round(grey.shape[0] * scale))) / scale).astype(int), grey.shape[0] - 1)
        cols = np.minimum((np.arange(max(1, round(grey.shape[1] * scale))) / scale).astype(int), grey.shape[1] - 1)
        cell = np.empty((CELL + 14, CELL, 3), np.uint8)
        cell[:] = BACKGROUND
        top, left = 14 + (CELL - len(rows)) // 2, (CELL - len(cols)) // 2
        cell[top:top + len(rows), left:left + len(cols)] = grey[rows][:, cols, None]
        img = Image.fromarray(cell)
        ImageDraw.Draw(img).text((4, 1), name, fill=TEXT)
        cells.append(np.asarray(img))
    body = np.concatenate([np.pad(c, ((0, 0), (2, 2), (0, 0)), constant_values=24) for c in cells], axis=1)
    head = Image.new("RGB", (body.shape[1], 16), BACKGROUND)
    ImageDraw.Draw(head).text((4, 2), title[:body.shape[1] // 6], fill=TEXT)
    return np.concatenate([np.asarray(head), body], axis=0)


def save_input(folder: str, row: int, path: str, arr: np.ndarray, cfg: PreprocessConfig, roi=None,
               geometry: sitk.Image | None = None) -> list[str]:
    """Write the row's input (float32 [D, H, W] or [C, D, H, W], as fed to the model) as NIfTI on its geometry
    (computed by `input_geometry` unless given; several channels: a 4D file, channels along its last axis in
    cfg.channels order), and its montage as PNG (one row of slices per channel); returns both paths. The NIfTI
    keeps the values the model sees: for a ct channel HU = LO + v (HI - LO) for the window the title names."""
    arr = np.asarray(arr, dtype=np.float32)
    arr = arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr
    nii, png = input_names(folder, row, path)
    grid = geometry if geometry is not None else input_geometry(path, cfg, roi, arr.shape[-3:])
    if arr.ndim == 3:
        image = sitk.GetImageFromArray(arr)
        image.CopyInformation(grid)
    else:
        parts = [sitk.GetImageFromArray(a) for a in arr]
        for p in parts:
            p.CopyInformation(grid)
        image = sitk.JoinSeries(parts)
    atomic_write(nii, lambda tmp: sitk.WriteImage(image, tmp, True))
    where = "" if roi is None else (f", ROI around {roi}" if isinstance(roi, str) else
                                    f", ROI around ({', '.join(f'{float(v):.1f}' for v in roi)}) mm {cfg.roi_coords}")
    if arr.ndim == 3:
        title = f"row {row}: {os.path.basename(str(path))}{where}; window {cfg.window[0]:g}..{cfg.window[1]:g} HU"
        if not cfg.plain:
            title = f"row {row}: {os.path.basename(str(path))}{where}; {cfg.describe_channels()}"
        picture = montage(arr if cfg.bounded else _shown(arr), title)
    else:
        names = cfg.channel_names
        rows = [montage(a if cfg.norm[c] != "zscore" else _shown(a),
                        f"row {row} {names[c]} ({cfg.describe_channels().split(', ')[c].split(' (', 1)[1]}"
                        f"{where if c == 0 else ''}") for c, a in enumerate(arr)]
        picture = np.concatenate(rows, axis=0)
    atomic_write(png, lambda tmp: Image.fromarray(picture).save(tmp, format="PNG"))
    return [nii, png]


def _shown(vol: np.ndarray) -> np.ndarray:
    """A channel whose values leave [0, 1] (zscore) scaled from its 0.5-99.5 percentiles to [0, 1] for the picture."""
    lo, hi = np.percentile(vol, (0.5, 99.5))
    return (vol - lo) / max(float(hi - lo), 1e-6)
