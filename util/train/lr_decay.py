"""Optimizer parameter groups: MAE-style layer-wise lr decay (finetuning) and plain weight decay (pretraining)."""
from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

# Learned tokens and positional tables: never weight-decayed.
TOKEN_NAMES = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed", "dist_token")


def _strip_encoder(name: str) -> str:
    """'encoder.blocks.3.x' -> 'blocks.3.x' (UNETR3D nests its ViT as `encoder`)."""
    return name[len("encoder."):] if name.startswith("encoder.") else name


def _no_decay(name: str, param: nn.Parameter, no_weight_decay_list: Iterable[str]) -> bool:
    """True for 1-D params (norms, biases), biases, tokens and listed names (full or `encoder.`-stripped)."""
    short = _strip_encoder(name)
    return (param.ndim <= 1 or name.endswith(".bias") or short.split(".")[-1] in TOKEN_NAMES
            or name in no_weight_decay_list or short in no_weight_decay_list)


def get_layer_id_for_vit(name: str, num_layers: int) -> int:
    """Layer id of a parameter: 0 for tokens and patch embedding, i + 1 for `blocks.i`, num_layers otherwise.

    Args:
        name: parameter name, optionally prefixed with `encoder.`.
        num_layers: len(blocks) + 1.
    """
    name = _strip_encoder(name)
    if name in ("cls_token", "pos_embed", "mask_token", "dist_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, no_weight_decay_list: Iterable[str] = (),
                     layer_decay: float = 0.75) -> list[dict]:
    """Parameter groups with layer-wise lr decay, as in MAE finetuning.

    Each group holds params of one layer id and one decay setting, with
    `lr_scale = layer_decay ** (num_layers - layer_id)` where num_layers = len(blocks) + 1: the head,
    final norms and any decoder (UNETR) modules train at scale 1, the patch embedding at the smallest scale.
    The ViT's blocks are found at `model.blocks` or `model.encoder.blocks`. Frozen params are skipped.

    Args:
        model: a VisionTransformer3D, or a module holding one as `encoder` (UNETR3D).
        weight_decay: decay of weight matrices; 1-D params, biases, tokens and listed names get 0.
        no_weight_decay_list: parameter names without decay (e.g. `model.no_weight_decay()`).
        layer_decay: multiplicative lr decay per layer going from the head to the input.

    Returns:
        list of {'params', 'weight_decay', 'lr_scale'} dicts for a torch optimizer.
    """
    encoder = getattr(model, "encoder", None)
    vit = encoder if isinstance(getattr(encoder, "blocks", None), nn.ModuleList) else model
    if not isinstance(getattr(vit, "blocks", None), nn.ModuleList):
        raise ValueError(f"param_groups_lrd: expected {type(model).__name__} (or its `encoder`) to have a "
                         f"`blocks` ModuleList of transformer blocks.")
    no_weight_decay_list = set(no_weight_decay_list)
    num_layers = len(vit.blocks) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer_id = get_layer_id_for_vit(name, num_layers)
        no_decay = _no_decay(name, param, no_weight_decay_list)
        key = (layer_id, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (num_layers - layer_id)}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def param_groups_weight_decay(model: nn.Module, weight_decay: float,
                              no_weight_decay_list: Iterable[str] = ()) -> list[dict]:
    """Two parameter groups for pretraining: no decay for norms, biases and tokens, `weight_decay` otherwise.

    Args:
        model: any module (MaskedAutoencoderViT3D). Frozen params (e.g. fixed pos_embed) are skipped.
        weight_decay: decay of weight matrices.
        no_weight_decay_list: further parameter names without decay.

    Returns:
        [{'params': no-decay params, 'weight_decay': 0.}, {'params': decay params, 'weight_decay': weight_decay}],
        leaving out a group that would be empty.
    """
    no_weight_decay_list = set(no_weight_decay_list)
    no_decay, decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if _no_decay(name, param, no_weight_decay_list) else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]
