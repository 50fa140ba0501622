"""3D sin-cos positional table: values checked against entries computed by hand with math.sin/cos."""
import math

import numpy as np
import pytest

from util.nn.pos_embed import get_1d_sincos_pos_embed_from_grid, get_3d_sincos_pos_embed, split_embed_dim


def part_by_hand(dim: int, pos: int) -> list[float]:
    """One row of the 1D table, written out from the definition in the README's "Model contract"."""
    half = dim // 2
    freqs = [10000.0 ** (-i / half) for i in range(half)]
    row = [math.sin(pos * f) for f in freqs] + [math.cos(pos * f) for f in freqs]
    if dim % 2:
        row.append(math.sin(pos / 10000.0))
    return row


def row_by_hand(embed_dim: int, d: int, h: int, w: int) -> np.ndarray:
    base, rem = embed_dim // 3, embed_dim % 3
    sizes = (base, base + (1 if rem > 1 else 0), base + (1 if rem > 0 else 0))
    return np.array(part_by_hand(sizes[0], d) + part_by_hand(sizes[1], h) + part_by_hand(sizes[2], w))


def test_split_sizes_follow_design():
    assert split_embed_dim(12) == (4, 4, 4)
    assert split_embed_dim(16) == (5, 5, 6)
    assert split_embed_dim(17) == (5, 6, 6)
    assert split_embed_dim(1024) == (341, 341, 342)
    assert split_embed_dim(512) == (170, 171, 171)


def test_1d_table_entries():
    table = get_1d_sincos_pos_embed_from_grid(5, np.arange(4))
    assert table.shape == (4, 5)
    # dim 5: half 2, w = (1, 10000^-0.5); columns sin, sin, cos, cos, extra sin(pos/1e4)
    assert table[3, 0] == pytest.approx(math.sin(3.0))
    assert table[3, 1] == pytest.approx(math.sin(3.0 * 0.01))
    assert table[3, 2] == pytest.approx(math.cos(3.0))
    assert table[3, 3] == pytest.approx(math.cos(3.0 * 0.01))
    assert table[3, 4] == pytest.approx(math.sin(3.0 / 10000.0))
    assert np.all(table[0, :2] == 0) and np.all(table[0, 2:4] == 1)


@pytest.mark.parametrize("embed_dim", [12, 16, 1024])
@pytest.mark.parametrize("dhw", [(1, 2, 3), (0, 1, 2), (1, 0, 3)])
def test_3d_table_matches_hand_computed_rows(embed_dim, dhw):
    grid = (2, 3, 4)  # non-cubic: each part must use its own axis index
    table = get_3d_sincos_pos_embed(embed_dim, grid, cls_token=True)
    assert table.shape == (1 + 24, embed_dim) and table.dtype == np.float32
    d, h, w = dhw
    token = d * grid[1] * grid[2] + h * grid[2] + w
    np.testing.assert_allclose(table[1 + token], row_by_hand(embed_dim, d, h, w), rtol=1e-5, atol=1e-6)


def test_cls_row_zero_and_optional():
    with_cls = get_3d_sincos_pos_embed(16, (2, 3, 4), cls_token=True)
    without = get_3d_sincos_pos_embed(16, (2, 3, 4), cls_token=False)
    assert np.all(with_cls[0] == 0)
    np.testing.assert_array_equal(with_cls[1:], without)


def test_odd_parts_get_extra_sin_column():
    table = get_3d_sincos_pos_embed(16, (2, 3, 4))  # parts 5, 5, 6: depth and height parts are odd
    tokens = np.arange(24)
    d, h = tokens // 12, (tokens // 4) % 3
    np.testing.assert_allclose(table[:, 4], np.sin(d / 10000.0), rtol=1e-6)
    np.testing.assert_allclose(table[:, 9], np.sin(h / 10000.0), rtol=1e-6)


def test_each_part_depends_only_on_its_axis():
    grid = (2, 3, 4)
    table = get_3d_sincos_pos_embed(12, grid).reshape(*grid, 12)
    depth, height, width = table[..., :4], table[..., 4:8], table[..., 8:]
    assert np.allclose(depth, depth[:, :1, :1])  # constant over h, w
    assert np.allclose(height, height[:1, :, :1])
    assert np.allclose(width, width[:1, :1, :])
    assert not np.allclose(depth[0], depth[1])


def test_int_grid_is_cube():
    np.testing.assert_array_equal(get_3d_sincos_pos_embed(24, 3), get_3d_sincos_pos_embed(24, (3, 3, 3)))


def test_too_small_embed_dim_rejected():
    with pytest.raises(ValueError, match="embed_dim >= 3"):
        get_3d_sincos_pos_embed(2, 2)
