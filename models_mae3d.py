"""3D Masked Autoencoder with a ViT backbone (MAE, He et al. 2021) for CT volumes.

State-dict keys match the TANGERINE ViT-Large checkpoint (README, "Model contract"; tests/test_models_mae3d.py).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from util.nn.patch_embed import PatchEmbed3D, patchify, unpatchify
from util.nn.pos_embed import get_3d_sincos_pos_embed
from util.nn.registry import SIZES, register_model


def fixed_pos_embed(embed_dim: int, grid_size: Sequence[int], device: torch.device | None = None) -> nn.Parameter:
    """Frozen sin-cos table as a parameter [1, 1 + Gd*Gh*Gw, E] (cls row zeros), like MAE."""
    table = torch.from_numpy(get_3d_sincos_pos_embed(embed_dim, tuple(grid_size), cls_token=True))
    return nn.Parameter(table.unsqueeze(0).to(device), requires_grad=False)


def init_transformer_weights(module: nn.Module) -> None:
    """MAE init: xavier-uniform Linear weights with zero bias, LayerNorm weight 1 and bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_patch_embed(patch_embed: PatchEmbed3D) -> None:
    """Xavier-uniform on the patch weight viewed as a [E, C*pd*ph*pw] matrix (as MAE does for Linear)."""
    w = patch_embed.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """Apply blocks in order, optionally with non-reentrant activation checkpointing per block."""
    use_ckpt = grad_checkpointing and torch.is_grad_enabled()
    for blk in blocks:
        x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
    return x


def make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, norm_layer: Callable,
                drop_path_rate: float = 0.0, qkv_bias: bool = True) -> nn.ModuleList:
    """`depth` timm Blocks (fused attention, qkv bias) with linearly increasing drop path."""
    dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    return nn.ModuleList([
        Block(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer, drop_path=dpr[i])
        for i in range(depth)
    ])


class MaskedAutoencoderViT3D(nn.Module):
    """Masked autoencoder with a 3D ViT encoder and a light transformer decoder.

    Args:
        img_size: input size (D, H, W) or an int for a cube.
        patch_size: patch size (pd, ph, pw) or an int; must divide img_size on every axis.
        in_chans: input channels C.
        norm_pix_loss: regress per-patch normalised voxels (decoder then has no Sigmoid).
        grad_checkpointing: recompute each block in backward to save activation memory.
    """

    def __init__(self, img_size: int | Sequence[int] = 256, patch_size: int | Sequence[int] = 16,
                 in_chans: int = 1, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_layer: Callable = partial(nn.LayerNorm, eps=1e-6),
                 norm_pix_loss: bool = False, drop_path_rate: float = 0.0,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed3D(img_size, patch_size, in_chans, embed_dim)
        self.img_size, self.patch_size = self.patch_embed.img_size, self.patch_embed.patch_size
        self.grid_size, self.num_patches = self.patch_embed.grid_size, self.patch_embed.num_patches
        self.in_chans, self.norm_pix_loss = in_chans, norm_pix_loss
        self.grad_checkpointing = grad_checkpointing
        patch_dim = self.patch_size[0] * self.patch_size[1] * self.patch_size[2] * in_chans
        device = self.patch_embed.proj.weight.device

        # encoder
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = fixed_pos_embed(embed_dim, self.grid_size, device)
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, norm_layer, drop_path_rate)
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = fixed_pos_embed(decoder_embed_dim, self.grid_size, device)
        self.decoder_blocks = make_blocks(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
                                          norm_layer)
        self.decoder_norm = norm_layer(decoder_embed_dim)
        head = [nn.Linear(decoder_embed_dim, patch_dim)]
        if not norm_pix_loss:  # targets are voxels in [0, 1]
            head.append(nn.Sigmoid())
        self.decoder_pred = nn.Sequential(*head)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE initialisation (the fixed sin-cos tables are set in __init__)."""
        init_patch_embed(self.patch_embed)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_transformer_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn per-block activation checkpointing on or off (encoder and decoder)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay."""
        return {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed"}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, D, H, W] -> [N, L, pd*ph*pw*C]."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, pd*ph*pw*C] -> [N, C, D, H, W]."""
        return unpatchify(x, self.patch_size, self.grid_size, self.in_chans)

    def mask_indices(self, n: int, length: int, mask_ratio: float, noise: torch.Tensor | None,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by argsort of noise (smallest noise kept).

        Returns:
            ids_keep [N, K] with K = int(L * (1 - mask_ratio)), mask [N, L] (0 keep, 1 remove),
            ids_restore [N, L] (un-shuffles [kept, removed] back to token order).
        """
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        len_keep = max(int(length * (1 - mask_ratio)), 1)
        if noise is None:
            noise = torch.rand(n, length, device=device)
        elif tuple(noise.shape) != (n, length):
            raise ValueError(f"noise must have shape [N, L] = {[n, length]}, got {list(noise.shape)}.")
        ids_shuffle = torch.argsort(noise.to(device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = torch.ones(n, length, device=device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return ids_keep, mask, ids_restore

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens per sample.

        Args:
            x: [N, L, D] tokens; noise: optional [N, L] (argsort ascending, smallest kept).

        Returns:
            x_masked [N, K, D], mask [N, L] (1 = removed), ids_restore [N, L].
        """
        n, length, dim = x.shape
        ids_keep, mask, ids_restore = self.mask_indices(n, length, mask_ratio, noise, x.device)
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed and encode only the kept patches.

        Returns:
            latent [N, 1+K, E], mask [N, L], ids_restore [N, L].
        """
        self.patch_embed.check_input(imgs)
        patches = self.patchify(imgs)  # [N, L, P]
        n, length, p = patches.shape
        ids_keep, mask, ids_restore = self.mask_indices(n, length, mask_ratio, noise, imgs.device)
        kept = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, p))
        # identical to conv-embedding all patches then dropping tokens, but only K matmul rows
        x = self.patch_embed.embed_patches(kept) + self.pos_embed[0, 1:][ids_keep]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+K, E], ids_restore [N, L] -> pred [N, L, pd*ph*pw*C]."""
        x = self.decoder_embed(latent)
        n, k1, dim = x.shape
        length = ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(n, length + 1 - k1, -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [N, L, Dd] in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        x = run_blocks(self.decoder_blocks, x, self.grad_checkpointing)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]

    def loss_target(self, imgs: torch.Tensor) -> torch.Tensor:
        """What the decoder regresses: fp32 patches [N, L, P], with norm_pix_loss each patch's voxels of each channel
        normalised to zero mean and unit variance (channels differ in units: an MRI sequence's contrast is its own)."""
        target = self.patchify(imgs).float()
        if self.norm_pix_loss and self.in_chans == 1:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        elif self.norm_pix_loss:  # voxels ordered (pd, ph, pw, c): channel c is every C-th
            n, length, p = target.shape
            per = target.view(n, length, p // self.in_chans, self.in_chans)
            mean = per.mean(dim=-2, keepdim=True)
            var = per.var(dim=-2, keepdim=True)
            target = ((per - mean) / (var + 1e-6) ** 0.5).view(n, length, p)
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on removed patches only, computed in fp32.

        Args:
            imgs: [N, C, D, H, W]; pred: [N, L, P]; mask: [N, L] (1 = removed).
        """
        target = self.loss_target(imgs)
        loss = (pred.float() - target).pow(2).mean(dim=-1)  # [N, L] per-patch loss
        mask = mask.float()
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [N, C, D, H, W] -> (loss scalar fp32, pred [N, L, P], mask [N, L])."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def _build(size: str, **kwargs) -> MaskedAutoencoderViT3D:
    """MAE of a named size (util.nn.registry.SIZES); kwargs override every default."""
    s = SIZES[size]
    cfg = dict(img_size=256, patch_size=16, in_chans=1, embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads,
               decoder_embed_dim=s.decoder_embed_dim, decoder_depth=s.decoder_depth,
               decoder_num_heads=s.decoder_num_heads, mlp_ratio=4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(kwargs)
    return MaskedAutoencoderViT3D(**cfg)


@register_model
def mae_vit_tiny_patch16(**kwargs) -> MaskedAutoencoderViT3D:
    """ViT-Ti/16 encoder (192 x 12, 3 heads), decoder 128 x 4."""
    return _build("tiny", **kwargs)


@register_model
def mae_vit_small_patch16(**kwargs) -> MaskedAutoencoderViT3D:
    """ViT-S/16 encoder (384 x 12, 6 heads), decoder 256 x 4."""
    return _build("small", **kwargs)


@register_model
def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT3D:
    """ViT-B/16 encoder (768 x 12, 12 heads), decoder 512 x 8."""
    return _build("base", **kwargs)


@register_model
def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT3D:
    """ViT-L/16 encoder (1024 x 24, 16 heads), decoder 512 x 8: the TANGERINE architecture at 256^3."""
    return _build("large", **kwargs)


@register_model
def mae_vit_huge_patch16(**kwargs) -> MaskedAutoencoderViT3D:
    """ViT-H/16 encoder (1280 x 32, 16 heads), decoder 512 x 8."""
    return _build("huge", **kwargs)
