"""MAE reconstruction figures: orthogonal mid-slices of input, masked input and reconstruction as one PNG.

Written with PIL only (no matplotlib); the returned HWC uint8 array goes straight to TensorBoard with
`writer.add_image(tag, array, step, dataformats='HWC')`.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from util.atomic import atomic_write

ROW_TITLES = ("input", "masked", "recon")
COL_TITLES = ("axial", "coronal", "sagittal")
MASK_GREY = 128          # masked-out voxels
BACKGROUND = (24, 24, 48)  # letterbox / margins, distinct from any grey level
LABEL_W, LABEL_H, GAP = 56, 16, 4


def _to_volume(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """[C, D, H, W] or [D, H, W] tensor/array -> float32 [D, H, W] (channel 0)."""
    arr = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)
    if arr.ndim == 4:
        arr = arr[0]
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ValueError(f"save_reconstruction_figure: expected {name} of shape [C, D, H, W] or [D, H, W], "
                         f"got {tuple(x.shape)}.")
    return arr


def mid_slices(vol: np.ndarray) -> list[np.ndarray]:
    """Axial [H, W], coronal [D, W] and sagittal [D, H] mid-slices of a [D, H, W] volume.

    Coronal and sagittal slices are flipped vertically so the last depth index (superior in LPS/RAS
    arrays) is at the top.
    """
    d, h, w = vol.shape
    return [vol[d // 2], vol[::-1, h // 2, :], vol[::-1, :, w // 2]]


def _fit_cell(gray: np.ndarray, cell: int) -> np.ndarray:
    """Nearest-neighbour resize of a uint8 [h, w] slice to fit cell x cell (aspect kept), letterboxed RGB."""
    h, w = gray.shape
    scale = cell / max(h, w)
    out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
    rows = np.minimum(np.arange(out_h) * h // out_h, h - 1)
    cols = np.minimum(np.arange(out_w) * w // out_w, w - 1)
    canvas = np.empty((cell, cell, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    top, left = (cell - out_h) // 2, (cell - out_w) // 2
    canvas[top:top + out_h, left:left + out_w] = gray[rows][:, cols][..., None]
    return canvas


def _to_uint8(sl: np.ndarray, removed: np.ndarray | None) -> np.ndarray:
    """[0, 1] float slice -> uint8, with removed (or non-finite) voxels set to mid-grey."""
    bad = ~np.isfinite(sl)
    if removed is not None:
        bad |= removed
    out = (np.clip(np.nan_to_num(sl, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    out[bad] = MASK_GREY
    return out


def render_reconstruction_grid(img: torch.Tensor, masked: torch.Tensor, recon: torch.Tensor,
                               mask: torch.Tensor | None = None, cell: int = 128, title: str = "") -> np.ndarray:
    """3x3 grid (rows: input / masked / recon; columns: axial / coronal / sagittal) as uint8 [H', W', 3].

    Args:
        img, masked, recon: [C, D, H, W] or [D, H, W] intensities in [0, 1] (channel 0 is shown).
        mask: optional voxel mask of the same spatial shape, 1 = removed; removed voxels (and any NaN in
            `masked`) are drawn mid-grey in the masked row.
        cell: side of each grid cell in pixels.
        title: a line of text under the grid (e.g. the epoch and the loss).
    """
    vols = [_to_volume(v, n) for v, n in ((img, "img"), (masked, "masked"), (recon, "recon"))]
    if not vols[0].shape == vols[1].shape == vols[2].shape:
        raise ValueError(f"save_reconstruction_figure: expected img, masked and recon of one shape, "
                         f"got {[v.shape for v in vols]}.")
    removed = None
    if mask is not None:
        removed = _to_volume(mask, "mask") > 0.5
        if removed.shape != vols[0].shape:
            raise ValueError(f"save_reconstruction_figure: expected mask of spatial shape {vols[0].shape}, "
                             f"got {removed.shape}.")
    step = cell + GAP
    canvas = np.empty((LABEL_H * (2 if title else 1) + 3 * step, LABEL_W + 3 * step, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for r, vol in enumerate(vols):
        masks = mid_slices(removed) if (r == 1 and removed is not None) else [None] * 3
        for c, (sl, rm) in enumerate(zip(mid_slices(vol), masks)):
            y, x = LABEL_H + r * step, LABEL_W + c * step
            canvas[y:y + cell, x:x + cell] = _fit_cell(_to_uint8(sl, rm), cell)
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    for c, name in enumerate(COL_TITLES):
        draw.text((LABEL_W + c * step + 2, 2), name, fill=(255, 255, 255))
    for r, name in enumerate(ROW_TITLES):
        draw.text((2, LABEL_H + r * step + cell // 2 - 6), name, fill=(255, 255, 255))
    if title:
        draw.text((2, LABEL_H + 3 * step + 1), title, fill=(255, 255, 255))
    return np.asarray(pil, dtype=np.uint8).copy()


def save_reconstruction_figure(img: torch.Tensor, masked: torch.Tensor, recon: torch.Tensor, path: str,
                               mask: torch.Tensor | None = None, cell: int = 128, title: str = "") -> np.ndarray:
    """Write the input / masked / reconstruction mid-slice grid as a PNG (atomically) and return it.

    Args:
        img, masked, recon: [C, D, H, W] (or [D, H, W]) intensities in [0, 1]; values are clipped.
        path: output PNG path; parent folders are created.
        mask: optional [1, D, H, W] voxel mask, 1 = removed, drawn mid-grey in the masked row
            (NaN voxels in `masked` are drawn the same way).
        cell: side of each grid cell in pixels.
        title: a line of text under the grid.

    Returns:
        uint8 [H', W', 3] image array (for `add_image(..., dataformats='HWC')`).
    """
    grid = render_reconstruction_grid(img, masked, recon, mask=mask, cell=cell, title=title)
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    return grid
