"""Batches to the training device: float32 batches as they are, uint16 batches (bit-cast to int16, see
util.data.dataset) scaled to [0, 1] there, with the deferred flips of the innermost axis applied on the device."""
from __future__ import annotations

import torch

from util.volume.cache import QMAX

_SCALE = torch.tensor(1.0 / QMAX, dtype=torch.float32).item()  # the float32 constant util.volume.cache.decode uses


def decode_on_device(x: torch.Tensor) -> torch.Tensor:
    """int16 bit patterns of uint16 cache values -> float32 in [0, 1], the same numbers util.volume.cache.decode gives."""
    v = x.to(torch.float32)
    v = torch.where(v < 0, v + 65536.0, v)
    return v.mul_(_SCALE)  # a Python scalar: no host-to-device copy per batch


def to_device(batch, device, flip_target: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, D, H, W] float32 on `device`, target on `device`) from a loader batch.

    Batches are (images, target) with float32 images, or (images, target, flip) in uint16 transport, where
    flip [N] marks samples whose innermost axis is still to be flipped (also the target's when flip_target,
    i.e. a segmentation mask [N, D, H, W]).
    """
    imgs, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    if imgs.dtype == torch.int16:
        imgs = decode_on_device(imgs)
    if len(batch) > 2:
        flip = batch[2].to(device, non_blocking=True).bool()
        imgs = torch.where(flip.view(-1, 1, 1, 1, 1), imgs.flip(-1), imgs)
        if flip_target:
            target = torch.where(flip.view(-1, *([1] * (target.dim() - 1))), target.flip(-1), target)
    return imgs, target
