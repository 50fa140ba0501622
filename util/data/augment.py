"""Training augmentation and cropping of [D, H, W] arrays (or [C, D, H, W]: the spatial axes are the last three,
every channel cropped and flipped alike): random crops (foreground-biased for segmentation), random flips and
intensity jitter, all drawn from a NumPy Generator the dataset seeds per (seed, epoch, index)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


class Augment3D:
    """Random flips along `flip_axes` of [D, H, W] arrays (+ optional intensity jitter of the image only).

    The same draws flip image and mask, so their voxels stay paired. Arrays keep their dtype (float32, or the
    cache's uint16, which the training device scales); jitter needs float images.
    """

    def __init__(self, flip_axes: Sequence[int] = (0, 1, 2), flip_prob: float = 0.5,
                 intensity_jitter: float = 0.0) -> None:
        self.flip_axes, self.flip_prob, self.intensity_jitter = tuple(flip_axes), flip_prob, intensity_jitter

    def draw(self, rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[float, float] | None]:
        """(axes to flip, (scale, shift) or None), in the order the draws have always been made."""
        axes = tuple(a for a in self.flip_axes if rng.random() < self.flip_prob)
        jitter = None
        if self.intensity_jitter > 0:
            scale, shift = 1 + rng.uniform(-1, 1, 2) * self.intensity_jitter
            jitter = (float(scale), float(shift - 1))
        return axes, jitter

    def __call__(self, img: np.ndarray, mask: np.ndarray | None = None,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Flip (and jitter) image and mask; returns C-contiguous (img, mask)."""
        return self.apply(img, mask, rng)[:2]

    def apply(self, img: np.ndarray, mask: np.ndarray | None = None, rng: np.random.Generator | None = None,
              defer_axis: int | None = None) -> tuple[np.ndarray, np.ndarray | None, bool]:
        """`__call__` that can leave the flip of `defer_axis` to the caller: returns (img, mask, deferred), where
        `deferred` says whether that flip was drawn. Flipping the innermost axis of a uint16 volume costs a slow
        negative-stride copy that the training device does for free (util.data.transport)."""
        axes, jitter = self.draw(rng if rng is not None else np.random.default_rng())
        deferred = defer_axis in axes
        axes = tuple(a for a in axes if a != defer_axis)
        if axes:
            img = np.flip(img, tuple(a - 3 for a in axes))  # spatial axes: the last three
            mask = None if mask is None else np.flip(mask, tuple(a - 3 for a in axes))
        img = np.ascontiguousarray(img)
        if jitter is not None:
            if img.dtype.kind != "f":
                raise ValueError("Augment3D: intensity jitter needs float images, got " + str(img.dtype) + ".")
            img = np.clip(img * np.float32(jitter[0]) + np.float32(jitter[1]), 0, 1).astype(img.dtype, copy=False)
        return img, None if mask is None else np.ascontiguousarray(mask), deferred


def pad_to(a: np.ndarray, size: Sequence[int], value: float = 0) -> np.ndarray:
    """Centre-pad every spatial axis (the last len(size)) of `a` shorter than `size` with `value` (a no-op, no copy,
    when none is)."""
    lead = a.ndim - len(size)
    pad = [max(s - n, 0) for n, s in zip(a.shape[lead:], size)]
    if not any(pad):
        return a
    return np.pad(a, [(0, 0)] * lead + [(p // 2, p - p // 2) for p in pad], constant_values=value)


def center_crop_or_pad(array: np.ndarray, size: Sequence[int], pad_value: float = 0.0) -> np.ndarray:
    """[D, H, W] -> exactly `size`: centre crop larger axes, centre pad smaller ones with pad_value."""
    a = pad_to(array, size, pad_value)
    start = [(n - s) // 2 for n, s in zip(a.shape[a.ndim - len(size):], size)]
    return a[(Ellipsis, *(slice(b, b + s) for b, s in zip(start, size)))]


def foreground_index(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Flat indices of the foreground voxels of `mask` padded as `random_crop` pads it (compute once per volume)."""
    return np.flatnonzero(pad_to(mask, size, 0) > 0)


def random_crop(arrays: Sequence[np.ndarray], size: Sequence[int], rng: np.random.Generator,
                fg_mask: np.ndarray | None = None, fg_prob: float = 0.0,
                fg: np.ndarray | None = None) -> list[np.ndarray]:
    """Same random `size` crop of every [D, H, W] array (padded with 0 first when smaller); views when possible.

    With probability fg_prob (and a non-empty fg_mask) the crop contains a random foreground voxel; `fg` may
    pass `foreground_index(fg_mask, size)` computed earlier (the K crops of one volume share it).
    """
    arrays = [pad_to(a, size, 0) for a in arrays]
    shape = arrays[0].shape[arrays[0].ndim - len(size):]  # spatial: an image [C, D, H, W] and its mask [D, H, W]
    hi = [n - s for n, s in zip(shape, size)]
    start = [int(rng.integers(0, h + 1)) for h in hi]
    if fg_mask is not None and fg_prob > 0 and rng.random() < fg_prob:
        fg = foreground_index(fg_mask, size) if fg is None else fg
        if fg.size:
            c = np.unravel_index(fg[rng.integers(fg.size)], shape)
            start = [int(rng.integers(max(0, ci - s + 1), min(ci, h) + 1)) for ci, s, h in zip(c, size, hi)]
    return [a[(Ellipsis, *(slice(b, b + s) for b, s in zip(start, size)))] for a in arrays]
