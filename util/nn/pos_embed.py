"""Fixed sin-cos positional tables for 3D token grids (MAE-style, extended to depth x height x width)."""
from __future__ import annotations

import numpy as np


def get_1d_sincos_pos_embed_from_grid(dim: int, pos: np.ndarray) -> np.ndarray:
    """1D sin-cos table.

    Columns are [sin(pos * w_i) for i < half, cos(pos * w_i) for i < half] with half = dim // 2 and
    w_i = 10000^(-i / half), plus one extra column sin(pos / 10000) when dim is odd.

    Args:
        dim: number of output columns (>= 1).
        pos: positions, any shape (flattened to M values).

    Returns:
        float64 array [M, dim].
    """
    if dim < 1:
        raise ValueError(f"sin-cos embedding dimension must be >= 1, got {dim}.")
    pos = np.asarray(pos, dtype=np.float64).reshape(-1)
    half = dim // 2
    omega = 10000.0 ** (-np.arange(half, dtype=np.float64) / max(half, 1))
    angles = np.outer(pos, omega)  # [M, half]
    parts = [np.sin(angles), np.cos(angles)]
    if dim % 2:
        parts.append(np.sin(pos / 10000.0)[:, None])
    return np.concatenate(parts, axis=1)


def split_embed_dim(embed_dim: int) -> tuple[int, int, int]:
    """Depth / height / width column counts (E//3, E//3 + (E%3 > 1), E//3 + (E%3 > 0))."""
    base, rem = divmod(embed_dim, 3)
    return base, base + int(rem > 1), base + int(rem > 0)


def get_3d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int, int],
                            cls_token: bool = False) -> np.ndarray:
    """3D sin-cos table for a (Gd, Gh, Gw) token grid, tokens in depth-major order.

    Token t = d*Gh*Gw + h*Gw + w gets [1D(d) | 1D(h) | 1D(w)] with the part sizes of `split_embed_dim`.

    Args:
        embed_dim: total number of columns (>= 3).
        grid_size: Gd = Gh = Gw if int, else (Gd, Gh, Gw).
        cls_token: prepend one all-zero row for the cls token.

    Returns:
        float32 array [(1 if cls_token) + Gd*Gh*Gw, embed_dim].
    """
    if embed_dim < 3:
        raise ValueError(f"3D sin-cos embedding needs embed_dim >= 3, got {embed_dim}.")
    gd, gh, gw = (grid_size,) * 3 if isinstance(grid_size, int) else tuple(int(g) for g in grid_size)
    dd, dh, dw = split_embed_dim(embed_dim)
    d, h, w = np.meshgrid(np.arange(gd), np.arange(gh), np.arange(gw), indexing="ij")
    table = np.concatenate([
        get_1d_sincos_pos_embed_from_grid(dd, d),
        get_1d_sincos_pos_embed_from_grid(dh, h),
        get_1d_sincos_pos_embed_from_grid(dw, w),
    ], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return table.astype(np.float32)
