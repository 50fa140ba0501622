"""Reconstruction figure: a PNG grid of three orthogonal mid-slices for input / masked / reconstruction."""
import numpy as np
import pytest
import torch
from PIL import Image

from util.visualize import BACKGROUND, GAP, LABEL_H, LABEL_W, MASK_GREY, save_reconstruction_figure


def _grid_shape(cell: int) -> tuple[int, int, int]:
    return LABEL_H + 3 * (cell + GAP), LABEL_W + 3 * (cell + GAP), 3


def test_png_written_and_returned(tmp_path):
    img = torch.rand(1, 16, 16, 16)
    path = tmp_path / "sub" / "recon.png"
    arr = save_reconstruction_figure(img, img * 0.5, img, str(path))
    assert arr.dtype == np.uint8 and arr.shape == _grid_shape(128)
    on_disk = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(on_disk, arr)
    assert [p.name for p in path.parent.iterdir()] == ["recon.png"]  # no temporary left behind


def test_values_clipped_and_mask_drawn_grey(tmp_path):
    img = torch.full((1, 8, 8, 8), 2.0)       # clipped to 1 -> white
    recon = torch.full((1, 8, 8, 8), -1.0)    # clipped to 0 -> black
    mask = torch.ones(1, 8, 8, 8)             # everything removed -> mid-grey in row 2
    arr = save_reconstruction_figure(img, img, recon, str(tmp_path / "a.png"), mask=mask, cell=32)
    y0, x0, step = LABEL_H, LABEL_W, 32 + GAP
    centre = lambda r, c: arr[y0 + r * step + 16, x0 + c * step + 16]  # noqa: E731
    for c in range(3):
        assert tuple(centre(0, c)) == (255, 255, 255)
        assert tuple(centre(1, c)) == (MASK_GREY,) * 3
        assert tuple(centre(2, c)) == (0, 0, 0)


def test_non_cubic_volume_gives_aligned_grid(tmp_path):
    vol = np.zeros((8, 32, 16), dtype=np.float32)
    vol[4] = 1.0  # the axial mid-slice (index D//2 = 4) is white
    arr = save_reconstruction_figure(vol[None], vol[None], vol[None], str(tmp_path / "b.png"), cell=64)
    assert arr.shape == _grid_shape(64)
    y0, x0 = LABEL_H, LABEL_W
    axial = arr[y0:y0 + 64, x0:x0 + 64]
    # axial [H=32, W=16] fills the full height, half the width, letterboxed left and right
    assert tuple(axial[32, 32]) == (255, 255, 255)
    assert tuple(axial[32, 2]) == BACKGROUND
    coronal = arr[y0:y0 + 64, x0 + 64 + GAP:x0 + 128 + GAP]
    # coronal [D=8, W=16] -> 32 x 64 scaled; one white row (depth 4, flipped to row 3) among black rows
    col = coronal[:, 32, 0]
    assert set(col[:16].tolist()) == {BACKGROUND[0]} and (col == 255).sum() == 4


def test_mismatched_shapes_rejected(tmp_path):
    with pytest.raises(ValueError, match="one shape"):
        save_reconstruction_figure(torch.rand(1, 8, 8, 8), torch.rand(1, 8, 8, 4), torch.rand(1, 8, 8, 8),
                                   str(tmp_path / "c.png"))
