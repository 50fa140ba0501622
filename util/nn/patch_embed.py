"""3D patch helpers: patchify / unpatchify and a Conv3d-keyed patch embedding computed as one matmul."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.triple import to_3tuple


def patchify(imgs: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """Cut volumes into non-overlapping patches.

    Args:
        imgs: [N, C, D, H, W] with D, H, W divisible by the patch size.
        patch_size: (pd, ph, pw).

    Returns:
        [N, L, pd*ph*pw*C]; tokens depth-major, voxels inside a patch ordered (pd, ph, pw, c).
    """
    pd, ph, pw = to_3tuple(patch_size, "patch_size")
    n, c, d, h, w = imgs.shape
    if d % pd or h % ph or w % pw:
        raise ValueError(f"volume size {(d, h, w)} is not divisible by patch size {(pd, ph, pw)}.")
    x = imgs.reshape(n, c, d // pd, pd, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # N, gd, gh, gw, pd, ph, pw, C
    return x.reshape(n, (d // pd) * (h // ph) * (w // pw), pd * ph * pw * c)


def unpatchify(x: torch.Tensor, patch_size: Sequence[int], grid_size: Sequence[int],
               in_chans: int) -> torch.Tensor:
    """Inverse of `patchify`.

    Args:
        x: [N, L, pd*ph*pw*C] with L = gd*gh*gw.
        patch_size: (pd, ph, pw).
        grid_size: (gd, gh, gw).
        in_chans: C.

    Returns:
        [N, C, gd*pd, gh*ph, gw*pw].
    """
    pd, ph, pw = to_3tuple(patch_size, "patch_size")
    gd, gh, gw = to_3tuple(grid_size, "grid_size")
    n, length, p = x.shape
    if length != gd * gh * gw or p != pd * ph * pw * in_chans:
        raise ValueError(f"expected patches [N, {gd * gh * gw}, {pd * ph * pw * in_chans}], "
                         f"got {tuple(x.shape)}.")
    x = x.reshape(n, gd, gh, gw, pd, ph, pw, in_chans)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # N, C, gd, pd, gh, ph, gw, pw
    return x.reshape(n, in_chans, gd * pd, gh * ph, gw * pw)


class PatchEmbed3D(nn.Module):
    """Volume to patch tokens; parameters keyed like a Conv3d (`proj.weight` [E, C, pd, ph, pw]).

    `forward` never runs the convolution: a stride-equals-kernel Conv3d is exactly `patchify` followed by
    one matmul with the weight viewed as [E, pd*ph*pw*C], which is faster and lets the MAE embed only the
    patches it keeps.
    """

    def __init__(self, img_size: int | Sequence[int] = 256, patch_size: int | Sequence[int] = 16,
                 in_chans: int = 1, embed_dim: int = 1024) -> None:
        super().__init__()
        self.img_size = to_3tuple(img_size, "img_size")
        self.patch_size = to_3tuple(patch_size, "patch_size")
        for axis, (s, p) in enumerate(zip(self.img_size, self.patch_size)):
            if p < 1 or s % p:
                raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size} "
                                 f"on every axis (axis {axis} is not).")
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.in_chans = in_chans
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError unless x is [N, in_chans, *img_size] (shape check only, no host sync)."""
        if x.dim() != 5 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"expected input [N, {self.in_chans}, {', '.join(map(str, self.img_size))}] "
                             f"(N, C, D, H, W), got {tuple(x.shape)}.")

    def weight_matrix(self) -> torch.Tensor:
        """Conv weight as [E, pd*ph*pw*C], columns in `patchify` voxel order."""
        w = self.proj.weight
        return w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, L', pd*ph*pw*C] patches -> [N, L', E] tokens."""
        return F.linear(patches, self.weight_matrix(), self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, D, H, W] -> [N, L, E]; identical to flattening Conv3d(x) depth-major."""
        self.check_input(x)
        return self.embed_patches(patchify(x, self.patch_size))
