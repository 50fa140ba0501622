"""Batches to the training device: float32 batches as they are, uint16 batches (levels bit-cast to int16, see
util.data.dataset) scaled to [0, 1] there by each sample's float32 factor, with the flips the loader workers left
to the device (all three axes: the workers copy nothing)."""
from __future__ import annotations

import torch

from util.volume.cache import QMAX, scale_of


def decode_on_device(x: torch.Tensor, scale: torch.Tensor | float = scale_of(QMAX)) -> torch.Tensor:
    """int16 bit patterns of uint16 levels -> float32 in [0, 1]: level * scale, the numbers util.volume.cache.decode
    gives. scale: one float32 factor, or one per sample ([N] for x [N, ...])."""
    v = x.to(torch.float32)
    v = torch.where(v < 0, v + 65536.0, v)
    if isinstance(scale, torch.Tensor):
        return v.mul_(scale.to(v.device, torch.float32).view(-1, *([1] * (v.dim() - 1))))
    return v.mul_(scale)  # a Python scalar: no host-to-device copy per batch


def to_device(batch, device, flip_target: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, D, H, W] float32 on `device`, target on `device`) from a loader batch.

    Batches are (images, target) with float32 images, or (images, target, flip, scale) in uint16 transport, where
    flip [N] holds the flips still to be done per sample (bit 0 the innermost axis, bit 1 the middle, bit 2 the
    first; True = bit 0), also of the target when flip_target (a segmentation mask [N, D, H, W]), and scale [N] is
    each sample's factor from levels to [0, 1] (a batch without it has the earlier 65535 levels).
    """
    imgs, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    if len(batch) > 2:  # flipped before scaling: on 2 bytes a voxel when the batch is uint16
        flip = batch[2].to(device, non_blocking=True).to(torch.int32)
        for bit, dim in ((1, -1), (2, -2), (4, -3)):
            on = (flip & bit) != 0
            imgs = torch.where(on.view(-1, *([1] * (imgs.dim() - 1))), imgs.flip(dim), imgs)
            if flip_target:
                target = torch.where(on.view(-1, *([1] * (target.dim() - 1))), target.flip(dim), target)
    if imgs.dtype == torch.int16:
        imgs = decode_on_device(imgs, batch[3].to(device, non_blocking=True) if len(batch) > 3 else scale_of(QMAX))
    return imgs, target
