"""MAE reconstruction figures: orthogonal mid-slices of the input, its visible patches (masked ones in a colour no
tissue has) and the reconstruction (the model's output in the masked patches, the visible ones pasted from the input)
as one PNG.

Written with PIL only (no matplotlib); the returned HWC uint8 array goes straight to TensorBoard with
`writer.add_image(tag, array, step, dataformats='HWC')`.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from util.atomic import atomic_write

ROW_TITLES = ("input", "visible patches (masked ones in magenta)",
              "model output in masked patches, visible patches pasted back")
COL_TITLES = ("axial", "coronal", "sagittal")
MASK_COLOUR = (200, 30, 190)  # masked-out (or non-finite) voxels: saturated, unlike any grey level of tissue
BACKGROUND = (24, 24, 48)    # letterbox / margins, distinct from any grey level and from MASK_COLOUR
TEXT = (255, 255, 255)
MARGIN, LABEL_H, GAP = 4, 14, 4  # outer margin; height of a line of text (column titles, row titles, title)


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


def _fit_cell(rgb: np.ndarray, cell: int) -> np.ndarray:
    """Nearest-neighbour resize of a uint8 [h, w, 3] slice to fit cell x cell (aspect kept), letterboxed."""
    h, w = rgb.shape[:2]
    scale = cell / max(h, w)
    out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
    rows = np.minimum(np.arange(out_h) * h // out_h, h - 1)
    cols = np.minimum(np.arange(out_w) * w // out_w, w - 1)
    canvas = np.empty((cell, cell, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    top, left = (cell - out_h) // 2, (cell - out_w) // 2
    canvas[top:top + out_h, left:left + out_w] = rgb[rows][:, cols]
    return canvas


def _to_rgb(sl: np.ndarray, removed: np.ndarray | None) -> np.ndarray:
    """[0, 1] float slice -> grey uint8 [h, w, 3], with removed (or non-finite) voxels in MASK_COLOUR."""
    bad = ~np.isfinite(sl)
    if removed is not None:
        bad |= removed
    grey = (np.clip(np.nan_to_num(sl, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    out = np.repeat(grey[..., None], 3, axis=2)
    out[bad] = MASK_COLOUR
    return out


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` pixels (a single long word stays whole)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def grid_layout(cell: int, title_lines: int = 0) -> dict:
    """Pixel geometry of the grid: canvas size, the top-left corner of cell (row r, column c) is
    (rows[r], cols[c]); the row title of row r is drawn LABEL_H above rows[r]."""
    step = cell + GAP
    cols = [MARGIN + c * step for c in range(3)]
    rows = [MARGIN + LABEL_H + LABEL_H + r * (step + LABEL_H) for r in range(3)]
    height = rows[-1] + cell + MARGIN + title_lines * LABEL_H + (MARGIN if title_lines else 0)
    return {"height": height, "width": cols[-1] + cell + MARGIN, "rows": rows, "cols": cols}


def render_reconstruction_grid(img: torch.Tensor, masked: torch.Tensor, recon: torch.Tensor,
                               mask: torch.Tensor | None = None, cell: int = 128, title: str = "",
                               row_titles: tuple[str, str, str] = ROW_TITLES) -> np.ndarray:
    """3x3 grid (rows: input / visible patches / reconstruction; columns: axial / coronal / sagittal) as uint8
    [H', W', 3], each row under its title.

    Args:
        img, masked, recon: [C, D, H, W] or [D, H, W] intensities in [0, 1] (channel 0 is shown).
        mask: optional voxel mask of the same spatial shape, 1 = removed; removed voxels are drawn in MASK_COLOUR
            in the second row (non-finite voxels are, in any row).
        cell: side of each grid cell in pixels.
        title: text under the grid (e.g. the epoch and the loss), wrapped to the grid's width.
        row_titles: what each row shows, said as it is.
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
    width = grid_layout(cell)["width"]
    lines = _wrap(ImageDraw.Draw(Image.new("RGB", (1, 1))), title, width - 2 * MARGIN) if title else []
    geo = grid_layout(cell, len(lines))
    canvas = np.empty((geo["height"], geo["width"], 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for r, vol in enumerate(vols):
        masks = mid_slices(removed) if (r == 1 and removed is not None) else [None] * 3
        for c, (sl, rm) in enumerate(zip(mid_slices(vol), masks)):
            y, x = geo["rows"][r], geo["cols"][c]
            canvas[y:y + cell, x:x + cell] = _fit_cell(_to_rgb(sl, rm), cell)
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    for c, name in enumerate(COL_TITLES):
        draw.text((geo["cols"][c] + cell // 2 - draw.textlength(name) / 2, MARGIN), name, fill=TEXT)
    for r, name in enumerate(row_titles):
        draw.text((MARGIN, geo["rows"][r] - LABEL_H), name, fill=TEXT)
    for k, line in enumerate(lines):
        draw.text((MARGIN, geo["rows"][-1] + cell + MARGIN + k * LABEL_H), line, fill=TEXT)
    return np.asarray(pil, dtype=np.uint8).copy()


def save_reconstruction_figure(img: torch.Tensor, masked: torch.Tensor, recon: torch.Tensor, path: str,
                               mask: torch.Tensor | None = None, cell: int = 128, title: str = "",
                               channel_names: list[str] | None = None) -> np.ndarray:
    """Write the input / masked / reconstruction mid-slice grid as a PNG (atomically) and return it.

    Args:
        img, masked, recon: [C, D, H, W] (or [D, H, W]) intensities in [0, 1]; values are clipped.
        path: output PNG path; parent folders are created.
        mask: optional [1, D, H, W] voxel mask, 1 = removed, drawn in MASK_COLOUR in the second row
            (non-finite voxels are drawn the same way).
        cell: side of each grid cell in pixels.
        title: text under the grid.
        channel_names: several channels: one grid per channel, titled with these names (`render_channels`).

    Returns:
        uint8 [H', W', 3] image array (for `add_image(..., dataformats='HWC')`).
    """
    grid = render_channels(img, masked, recon, mask=mask, cell=cell, title=title, channel_names=channel_names)
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    return grid


def display_range(vol: np.ndarray) -> tuple[float, float]:
    """The range a channel is shown in: [0, 1], widened to its 0.5 and 99.5 percentiles when its values leave it
    (a zscore channel)."""
    lo, hi = (float(v) for v in np.percentile(vol[np.isfinite(vol)], (0.5, 99.5))) if np.isfinite(vol).any() \
        else (0.0, 1.0)
    lo, hi = min(lo, 0.0), max(hi, 1.0)
    return lo, hi


def render_channels(img, masked, recon, mask=None, cell: int = 128, title: str = "",
                    channel_names: list[str] | None = None) -> np.ndarray:
    """One `render_reconstruction_grid` per channel of [C, D, H, W] inputs, stacked top to bottom, each row titled
    with its channel's name (a single channel: exactly the one grid); channels whose values leave [0, 1] are shown
    over their `display_range`, the same for their three rows."""
    arrays = [x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, np.float32)
              for x in (img, masked, recon)]
    if arrays[0].ndim != 4 or arrays[0].shape[0] == 1:
        return render_reconstruction_grid(img, masked, recon, mask=mask, cell=cell, title=title)
    n = arrays[0].shape[0]
    names = list(channel_names or [f"channel {c + 1}" for c in range(n)])
    grids = []
    for c in range(n):
        lo, hi = display_range(arrays[0][c])
        shown = [(a[c] - lo) / (hi - lo) for a in arrays]
        rows = tuple(f"{names[c]}: {t}" for t in ROW_TITLES)
        grids.append(render_reconstruction_grid(*shown, mask=mask, cell=cell, title=title if c == n - 1 else "",
                                                row_titles=rows))
    return np.concatenate(grids, axis=0)
