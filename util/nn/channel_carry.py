"""Carrying a 1-channel model into C input channels (a CT MAE such as TANGERINE into a four-sequence MRI model).

The patch embedding kernel [E, 1, pd, ph, pw] becomes [E, C, pd, ph, pw]: replicated into every channel with
weight 1/C (so C copies of one image embed exactly as the 1-channel model embedded it), or, with
--channel_init random, the model's own fresh initialisation. An MAE's reconstruction head, whose outputs are the
voxels of a patch ordered (pd, ph, pw, c), gets each voxel's row once per channel, so every channel starts from the
1-channel model's reconstruction. Every other weight is kept as it is. A C-channel model is never carried into
another number of channels (which channel would go where is not knowable): refused in one sentence.
"""
from __future__ import annotations

import torch

from util.errors import UserError

CHANNEL_INITS = ("replicate", "random")


def carry_channels(sd: dict, model: torch.nn.Module, how: str, flag: str) -> tuple[dict, str | None]:
    """(`sd` fitted to `model`'s input channels, the one line saying what was done, or None when nothing was).

    sd: a state dict of an MAE or ViT (its `patch_embed.proj.weight` [E, C0, pd, ph, pw]); model: the model it is
    loaded into (its `patch_embed`); how: 'replicate' or 'random'; flag: '--init FILE' or '--finetune FILE'."""
    w = sd.get("patch_embed.proj.weight")
    own = model.patch_embed.proj.weight
    if w is None or w.ndim != 5 or int(w.shape[1]) == int(own.shape[1]):
        return sd, None
    c0, c = int(w.shape[1]), int(own.shape[1])
    if c0 != 1:
        raise UserError(f"{flag} holds a {c0}-channel model and this run has {c} channel(s); only a 1-channel model "
                        f"is carried into several channels, so give the {c0} channels it was trained on (--channels).")
    if how not in CHANNEL_INITS:
        raise ValueError(f"channel init must be one of {CHANNEL_INITS}, got {how!r}.")
    out = dict(sd)
    if how == "replicate":
        out["patch_embed.proj.weight"] = w.repeat(1, c, 1, 1, 1) / c
        said = f"replicated into each of the {c} channels with weight 1/{c}"
    else:
        out["patch_embed.proj.weight"] = own.detach().clone()
        said = f"initialised at random for the {c} channels"
    for key in ("decoder_pred.0.weight", "decoder_pred.0.bias"):
        head = sd.get(key)
        if head is not None and key in model.state_dict() and model.state_dict()[key].shape[0] == head.shape[0] * c:
            out[key] = head.repeat_interleave(c, dim=0)  # output (pd, ph, pw, c): voxel k's row for every channel
    decoder = " and its reconstruction head repeated for every channel" if "decoder_pred.0.weight" in out and \
        "decoder_pred.0.weight" in model.state_dict() else ""
    return out, (f"{flag} is a 1-channel model: its patch embedding kernel is {said} (--channel_init {how})"
                 f"{decoder}; every other weight is kept.")
