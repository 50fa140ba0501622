"""Batches to the training device: float32 batches as they are, uint16 batches (levels of HU bit-cast to int16, see
util.data.dataset) turned into [0, 1] there with each sample's HU window, after the flips the loader workers left to
the device (all three axes: the workers copy nothing)."""
from __future__ import annotations

import torch

from util.volume.cache import IDENTITY


def decode_on_device(x: torch.Tensor, window_map: torch.Tensor | tuple[float, float] = IDENTITY) -> torch.Tensor:
    """int16 bit patterns of uint16 levels -> float32 in [0, 1]: clip((level - offset) * factor, 0, 1), in the
    float32 steps util.volume.cache.decode takes, so the same numbers. window_map: (offset, factor), or one pair
    per sample ([N, 2] for x [N, ...]), or per sample and channel ([N, C, 4]: offset, factor, low, high, for x
    [N, C, ...]: clip((level - offset) * factor, low, high))."""
    v = x.to(torch.float32)
    if x.dtype == torch.int16:  # bit patterns of uint16 (int32 levels are already 0..65535)
        v = torch.where(v < 0, v + 65536.0, v)
    if isinstance(window_map, torch.Tensor) and window_map.dim() == 3:  # [N, C, 4]: per channel (util.volume.channels)
        m = window_map.to(v.device, torch.float32).view(*window_map.shape[:2], 4, *([1] * (v.dim() - 2)))
        v.sub_(m[:, :, 0]).mul_(m[:, :, 1])
        return torch.minimum(torch.maximum(v, m[:, :, 2]), m[:, :, 3])
    if isinstance(window_map, torch.Tensor):
        m = window_map.to(v.device, torch.float32).view(-1, 2, *([1] * (v.dim() - 1)))
        return v.sub_(m[:, 0]).mul_(m[:, 1]).clamp_(0.0, 1.0)
    offset, factor = window_map  # Python scalars: no host-to-device copy per batch
    return v.sub_(offset).mul_(factor).clamp_(0.0, 1.0)


def to_device(batch, device, flip_target: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, C, D, H, W] float32 on `device`, target on `device`) from a loader batch.

    Batches are (images, target) with float32 images, or (images, target, flip, window) in uint16 transport, where
    flip [N] holds the work still to be done per sample: bit 3 undo the slice differences along D (util.volume.
    cache_format) first, then flips (bit 0 the innermost axis, bit 1 the middle, bit 2 the first; True = bit 0), also
    of the target when flip_target (a segmentation mask [N, D, H, W]), and window [N, 2]
    is each sample's (offset, factor) from levels to [0, 1] (a batch without it has the earlier 65535 levels), or
    [N, C, 4] per channel (see `decode_on_device`).
    """
    imgs, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    levels = imgs.dtype == torch.int16
    if len(batch) > 2:
        flip = batch[2].to(device, non_blocking=True).to(torch.int32)
        per_channel = len(batch) > 3 and batch[3].dim() == 3  # several channels: never slice differences
        if levels and imgs.dim() > 3 and not per_channel:  # bit 3: slice differences (axis -3) to undo, modulo 2^16
            v = imgs.to(torch.int32) & 0xFFFF
            undone = torch.cumsum(v, dim=-3) & 0xFFFF
            imgs = torch.where(((flip & 8) != 0).view(-1, *([1] * (v.dim() - 1))), undone, v)
        for bit, dim in ((1, -1), (2, -2), (4, -3)):
            on = (flip & bit) != 0
            imgs = torch.where(on.view(-1, *([1] * (imgs.dim() - 1))), imgs.flip(dim), imgs)
            if flip_target:
                target = torch.where(on.view(-1, *([1] * (target.dim() - 1))), target.flip(dim), target)
    if levels:
        imgs = decode_on_device(imgs, batch[3].to(device, non_blocking=True) if len(batch) > 3 else IDENTITY)
    return imgs, target
