"""The original 3D-MAE compute path (niccolo246/3D-MAE-MedImaging `models_mae.py`), for benchmarks only.

`BaselineMAE3D` subclasses our `MaskedAutoencoderViT3D`, so it has the same modules, the same state_dict keys and
loads the same weights; only the forward computation is replaced by the upstream one:

- patch embedding is a cuDNN `nn.Conv3d` over the whole volume (all L patches are embedded, then 75% are dropped);
- the positional table is added to all L tokens before masking;
- masking gathers with an index repeated over the channel dimension (`ids_keep.unsqueeze(-1).repeat(1, 1, E)`);
- the decoder predicts (Linear + Sigmoid) for all L tokens, and the loss is computed on all L tokens then
  weighted by the mask, as in upstream MAE.

Attention and MLP blocks are the same timm `Block`s as ours (upstream pinned timm 0.9.16, whose `Block` already
uses fused scaled-dot-product attention), so the difference measured is the MAE compute path, not the blocks.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from models_mae3d import MaskedAutoencoderViT3D


def upstream_patchify(imgs: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """imgs [N, C, D, H, W] -> [N, L, pd*ph*pw*C] with the upstream reshape + einsum (voxel order pd, ph, pw, c)."""
    n, c, d, h, w = imgs.shape
    pd, ph, pw = patch_size
    x = imgs.reshape(n, c, d // pd, pd, h // ph, ph, w // pw, pw)
    x = torch.einsum("ncdphqwr->ndhwpqrc", x)
    return x.reshape(n, (d // pd) * (h // ph) * (w // pw), pd * ph * pw * c)


class BaselineMAE3D(MaskedAutoencoderViT3D):
    """MaskedAutoencoderViT3D with the original (unoptimised) forward pass. Same weights, same loss."""

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Upstream MAE masking. x [N, L, E] -> (x_masked [N, K, E], mask [N, L] 1 = removed, ids_restore [N, L])."""
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, dim))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """imgs [N, C, D, H, W] -> (latent [N, 1+K, E], mask [N, L], ids_restore [N, L]); conv over all patches."""
        proj = self.patch_embed.proj
        x = F.conv3d(imgs, proj.weight, proj.bias, stride=proj.stride)  # [N, E, Gd, Gh, Gw], cuDNN on GPU
        x = x.flatten(2).transpose(1, 2)  # [N, L, E], depth-major token order
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+K, E] -> pred [N, L, P] for every token (Sigmoid included unless norm_pix_loss)."""
        x = self.decoder_embed(latent)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE on all L tokens, averaged over the removed ones. pred [N, L, P], mask [N, L] -> scalar."""
        target = upstream_patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        loss = ((pred - target) ** 2).mean(dim=-1)  # [N, L]
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """imgs [N, C, D, H, W] -> (loss, pred [N, L, P], mask [N, L])."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def baseline_from(model: MaskedAutoencoderViT3D, share_weights: bool = True) -> BaselineMAE3D:
    """A BaselineMAE3D with `model`'s weights: shared tensors (shallow copy) or, with share_weights=False, a deep copy.

    Works for any factory-built model (tiny ... huge, any img/patch size) without repeating its constructor args.
    """
    base = copy.copy(model) if share_weights else copy.deepcopy(model)
    base.__class__ = BaselineMAE3D  # same attributes and submodules; only the methods above change
    return base
