"""3D ViT encoder for classification / embeddings, MAE checkpoint loading, and a UNETR-style segmenter."""
from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from models_mae3d import fixed_pos_embed, init_patch_embed, init_transformer_weights, make_blocks, run_blocks
from util.errors import UserError
from util.nn.patch_embed import PatchEmbed3D
from util.nn.channel_carry import carry_channels
from util.nn.pos_embed import get_3d_sincos_pos_embed
from util.nn.registry import SIZES, create_model, entry, model_names, register_model
from util.task.record import CheckpointRecord, read_record
from util.triple import to_3tuple

GLOBAL_POOLS = ("avg", "token", "cat")


def pool_tokens(tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """tokens [N, 1+L, E] -> [N, E]: 'token' = the class token, 'avg' = the mean of the L patch tokens;
    'cat' = both concatenated [N, 2E]."""
    if kind == "token":
        return tokens[:, 0]
    avg = tokens[:, 1:].mean(dim=1)
    return avg if kind == "avg" else torch.cat([tokens[:, 0], avg], dim=-1)


class VisionTransformer3D(nn.Module):
    """ViT over 3D patch tokens; parameter names match the MAE encoder so MAE checkpoints load directly.

    Args:
        img_size: input (D, H, W) or int; patch_size: (pd, ph, pw) or int.
        num_classes: head outputs; 0 gives an Identity head (embedding model).
        global_pool: 'avg' (mean of patch tokens -> fc_norm), 'token' (cls token after norm) or
            'cat' (concat(cls, patch mean) -> fc_norm, width 2E).
    """

    def __init__(self, img_size: int | Sequence[int] = 256, patch_size: int | Sequence[int] = 16,
                 in_chans: int = 1, num_classes: int = 2, embed_dim: int = 1024, depth: int = 24,
                 num_heads: int = 16, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: str = "avg",
                 norm_layer: Callable = partial(nn.LayerNorm, eps=1e-6), grad_checkpointing: bool = False) -> None:
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}.")
        self.patch_embed = PatchEmbed3D(img_size, patch_size, in_chans, embed_dim)
        self.img_size, self.patch_size = self.patch_embed.img_size, self.patch_embed.patch_size
        self.grid_size, self.num_patches = self.patch_embed.grid_size, self.patch_embed.num_patches
        self.embed_dim, self.depth, self.global_pool = embed_dim, depth, global_pool
        self.num_classes, self.grad_checkpointing = num_classes, grad_checkpointing
        self.num_features = 2 * embed_dim if global_pool == "cat" else embed_dim

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = fixed_pos_embed(embed_dim, self.grid_size, self.patch_embed.proj.weight.device)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, norm_layer, drop_path_rate,
                                  qkv_bias)
        self.norm = norm_layer(embed_dim) if global_pool == "token" else nn.Identity()
        self.fc_norm = nn.Identity() if global_pool == "token" else norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE-style init; a fresh head starts near zero (trunc-normal std 2e-5) as in MAE finetuning."""
        init_patch_embed(self.patch_embed)
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_transformer_weights)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn per-block activation checkpointing on or off."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay."""
        return {"pos_embed", "cls_token"}

    def reset_pos_embed(self) -> None:
        """Rewrite the fixed sin-cos table for this model's grid."""
        table = get_3d_sincos_pos_embed(self.embed_dim, self.grid_size, cls_token=True)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(table).unsqueeze(0))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, D, H, W] -> [N, 1+L, E] tokens with positions added."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls.to(x.dtype), x], dim=1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, D, H, W] -> tokens [N, 1+L, E] (after `norm` for 'token' pooling)."""
        x = run_blocks(self.blocks, self._embed(x), self.grad_checkpointing)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens [N, 1+L, E] -> pooled features [N, num_features] if pre_logits else logits [N, num_classes]."""
        x = self.fc_norm(pool_tokens(tokens, self.global_pool))
        return x if pre_logits else self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, D, H, W] -> logits [N, num_classes] ([N, num_features] when num_classes == 0)."""
        return self.forward_head(self.forward_features(x))

    def get_intermediate_layers(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Patch tokens [N, L, E] after each block in `indices` (0-based, negatives allowed), cls dropped."""
        wanted = [i + self.depth if i < 0 else i for i in indices]
        if any(not 0 <= i < self.depth for i in wanted):
            raise ValueError(f"block indices must be in [-{self.depth}, {self.depth}), got {list(indices)}.")
        x, outs = self._embed(x), {}
        for i, blk in enumerate(self.blocks[: max(wanted) + 1]):
            x = run_blocks([blk], x, self.grad_checkpointing)
            if i in wanted:
                outs[i] = x[:, 1:]
        return [outs[i] for i in wanted]


def _build(size: str, **kwargs) -> VisionTransformer3D:
    """ViT of a named size (util.nn.registry.SIZES); kwargs override every default."""
    s = SIZES[size]
    cfg = dict(img_size=256, patch_size=16, in_chans=1, embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads,
               mlp_ratio=4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(kwargs)
    return VisionTransformer3D(**cfg)


@register_model
def vit_tiny_patch16(**kwargs) -> VisionTransformer3D:
    """ViT-Ti/16 (192 x 12, 3 heads)."""
    return _build("tiny", **kwargs)


@register_model
def vit_small_patch16(**kwargs) -> VisionTransformer3D:
    """ViT-S/16 (384 x 12, 6 heads)."""
    return _build("small", **kwargs)


@register_model
def vit_base_patch16(**kwargs) -> VisionTransformer3D:
    """ViT-B/16 (768 x 12, 12 heads)."""
    return _build("base", **kwargs)


@register_model
def vit_large_patch16(**kwargs) -> VisionTransformer3D:
    """ViT-L/16 (1024 x 24, 16 heads): the TANGERINE encoder."""
    return _build("large", **kwargs)


@register_model
def vit_huge_patch16(**kwargs) -> VisionTransformer3D:
    """ViT-H/16 (1280 x 32, 16 heads)."""
    return _build("huge", **kwargs)


# Model keys a pretrained encoder may lack: the task head and the pooling norms (freshly initialised), and the
# positional table (regenerated for the model's grid). Any other missing key means another architecture.
EXPECTED_MISSING = ("head.", "fc_norm.", "norm.", "pos_embed")


def load_pretrained_encoder(model: VisionTransformer3D, checkpoint: str | os.PathLike | dict | CheckpointRecord,
                            verbose: bool = True, channel_init: str = "replicate",
                            flag: str | None = None) -> dict[str, list[str]]:
    """Load an MAE (or ViT) checkpoint into a VisionTransformer3D, possibly of another input size.

    `checkpoint` is a path (a file or a model folder), its CheckpointRecord (util.task.record), or a loaded dict in
    any container the record reads (TANGERINE's {'model': ...}, {'state_dict': ...}, a raw state dict). Decoder keys
    and `mask_token` are dropped, `pos_embed` is regenerated for the model's grid, `head.*` is dropped unless it
    fits the model's head, checkpoint keys the model lacks (e.g. `norm.*` for 'avg' pooling) are dropped. A 1-channel
    checkpoint into a model of C channels: util.nn.channel_carry (`channel_init`; `flag` names it in its line).

    Raises:
        ValueError: a key with another shape (naming it and both shapes), or model keys other than the head,
            pooling norms and positional table missing from the checkpoint (another architecture, e.g. fewer blocks).

    Returns:
        dict(loaded=[...], dropped=[...], missing=[...]) of key names.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        rec = read_record(checkpoint)
    elif isinstance(checkpoint, dict):
        rec = CheckpointRecord.from_dict(checkpoint)
    elif isinstance(checkpoint, CheckpointRecord):
        rec = checkpoint
    else:
        raise UserError(f"expected a checkpoint path, record or state dict, got {type(checkpoint).__name__}.")
    name = rec.source
    sd = rec.encoder_weights()  # a segmentation checkpoint's encoder too
    sd, carried = carry_channels(sd, model, channel_init, flag or str(name))
    if carried:
        print(carried)
    own = model.state_dict()
    loaded, dropped, to_load = [], [], {}
    for key, value in sd.items():
        if key.startswith("decoder_") or key == "mask_token" or key == "pos_embed" or key not in own:
            dropped.append(key)
        elif key.startswith("head.") and tuple(value.shape) != tuple(own[key].shape):
            dropped.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            raise UserError(f"checkpoint key {key!r} has shape {tuple(value.shape)} but the model expects "
                             f"{tuple(own[key].shape)} (check patch_size, in_chans and model size).")
        else:
            to_load[key] = value
            loaded.append(key)
    missing = [k for k in own if k not in to_load and k != "pos_embed"]
    foreign = [k for k in missing if not k.startswith(EXPECTED_MISSING)]
    if foreign:
        blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        raise UserError(f"{name} does not hold this encoder: {len(foreign)} of its tensors are missing (first "
                         f"{foreign[0]!r}); the checkpoint has {blocks} blocks, the model {model.depth} (pick the "
                         f"--model of the checkpoint).")
    model.load_state_dict(to_load, strict=False)
    model.reset_pos_embed()
    if verbose:
        print(f"load_pretrained_encoder: loaded {len(loaded)} tensors; pos_embed regenerated for grid "
              f"{tuple(model.grid_size)}")
        decoder = [k for k in dropped if k.startswith("decoder_")]
        others = [k for k in dropped if not k.startswith("decoder_")]
        print(f"  dropped ({len(dropped)}): {others}" + (f" + {len(decoder)} decoder_* keys" if decoder else ""))
        print(f"  missing, freshly initialised ({len(missing)}): {missing}")
    return {"loaded": loaded, "dropped": dropped, "missing": missing}


def backbone(model: nn.Module) -> VisionTransformer3D:
    """The VisionTransformer3D of a classifier (itself) or of a UNETR3D (its `encoder`)."""
    return model.encoder if isinstance(model, UNETR3D) else model


def unetr_strides(patch_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-axis upsampling strides for the UNETR decoder.

    The three coarse stages share stride t (2 if p >= 8 else 1) so MONAI's UnetrPrUpBlock can be used; the
    last stage (to full resolution) takes the rest, p // t**3. Requires power-of-two patch sizes.

    Returns:
        (t per axis, last-stage stride per axis).
    """
    coarse, last, sizes = [], [], to_3tuple(patch_size, "patch_size")
    for p in sizes:
        t = 2 if p >= 8 else 1
        if p < 1 or p & (p - 1) or p % t ** 3:
            raise UserError(f"UNETR3D needs power-of-two patch sizes, got {sizes}.")
        coarse.append(t)
        last.append(p // t ** 3)
    return tuple(coarse), tuple(last)


class UNETR3D(nn.Module):
    """UNETR-style segmentation (Hatamizadeh et al. 2022) on a VisionTransformer3D encoder, MONAI blocks.

    Skip features are the patch tokens after 4 evenly spaced encoder blocks (the last one through the
    encoder's `norm` when it has one), reshaped to [N, E, Gd, Gh, Gw] and upsampled back to full size.

    Args:
        encoder: VisionTransformer3D (its keys become `encoder.*`).
        num_classes: output channels (background included).
        feature_size: base channel count of the convolutional decoder.
    """

    def __init__(self, encoder: VisionTransformer3D, num_classes: int, feature_size: int = 16,
                 norm_name: str = "instance") -> None:
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock  # heavy import

        super().__init__()
        self.encoder, self.num_classes = encoder, num_classes
        depth, e, f = encoder.depth, encoder.embed_dim, feature_size
        if depth < 4:
            raise UserError(f"UNETR3D needs an encoder with >= 4 blocks, got {depth}.")
        self.feature_blocks = [depth * k // 4 - 1 for k in range(1, 5)]
        t, s = unetr_strides(encoder.patch_size)
        common = dict(spatial_dims=3, kernel_size=3, norm_name=norm_name)
        c = encoder.patch_embed.in_chans
        self.encoder1 = UnetrBasicBlock(in_channels=c, out_channels=f, stride=1, res_block=True, **common)
        self.encoder2, self.encoder3, self.encoder4 = (
            UnetrPrUpBlock(in_channels=e, out_channels=f * m, num_layer=n, stride=1, upsample_kernel_size=t,
                           conv_block=True, res_block=True, **common)
            for m, n in ((2, 2), (4, 1), (8, 0)))
        self.decoder5 = UnetrUpBlock(in_channels=e, out_channels=f * 8, upsample_kernel_size=t, res_block=True,
                                     **common)
        self.decoder4 = UnetrUpBlock(in_channels=f * 8, out_channels=f * 4, upsample_kernel_size=t,
                                     res_block=True, **common)
        self.decoder3 = UnetrUpBlock(in_channels=f * 4, out_channels=f * 2, upsample_kernel_size=t,
                                     res_block=True, **common)
        self.decoder2 = UnetrUpBlock(in_channels=f * 2, out_channels=f, upsample_kernel_size=s, res_block=True,
                                     **common)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=f, out_channels=num_classes)

    def _to_volume(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L, E] -> [N, E, Gd, Gh, Gw]."""
        n, _, e = tokens.shape
        return tokens.transpose(1, 2).reshape(n, e, *self.encoder.grid_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, D, H, W] -> logits [N, num_classes, D, H, W]."""
        f1, f2, f3, f4 = self.encoder.get_intermediate_layers(x, self.feature_blocks)
        f4 = self.encoder.norm(f4)
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(self._to_volume(f1))
        enc3 = self.encoder3(self._to_volume(f2))
        enc4 = self.encoder4(self._to_volume(f3))
        dec = self.decoder5(self._to_volume(f4), enc4)
        dec = self.decoder4(dec, enc3)
        dec = self.decoder3(dec, enc2)
        dec = self.decoder2(dec, enc1)
        return self.out(dec)


def build_segmentation_model(model_name: str, num_classes: int, img_size: int | Sequence[int],
                             patch_size: int | Sequence[int] = 16, in_chans: int = 1, feature_size: int = 16,
                             drop_path_rate: float = 0.0, **kw: Any) -> UNETR3D:
    """UNETR3D on a `vit_*_patch16` encoder (cls-token variant, so the MAE's `norm.*` loads too)."""
    if entry(model_name).family != "vit":
        raise UserError(f"{model_name} is not an encoder; expected one of {', '.join(model_names('vit'))}.")
    unetr_strides(patch_size)  # fail early on unsupported patch sizes
    norm_name = kw.pop("norm_name", "instance")
    encoder = create_model(model_name, img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                           global_pool="token", drop_path_rate=drop_path_rate, **kw)
    return UNETR3D(encoder, num_classes, feature_size=feature_size, norm_name=norm_name)
