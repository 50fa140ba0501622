"""Reconstruction figure: a PNG grid of three orthogonal mid-slices for input / visible patches / reconstruction."""
import numpy as np
import pytest
import torch
from PIL import Image

from util.volume.figure import BACKGROUND, MASK_COLOUR, ROW_TITLES, grid_layout, save_reconstruction_figure


def _grid_shape(cell: int, title_lines: int = 0) -> tuple[int, int, int]:
    geo = grid_layout(cell, title_lines)
    return geo["height"], geo["width"], 3


def test_png_written_and_returned(tmp_path):
    img = torch.rand(1, 16, 16, 16)
    path = tmp_path / "sub" / "recon.png"
    arr = save_reconstruction_figure(img, img * 0.5, img, str(path))
    assert arr.dtype == np.uint8 and arr.shape == _grid_shape(128)
    on_disk = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(on_disk, arr)
    assert [p.name for p in path.parent.iterdir()] == ["recon.png"]  # no temporary left behind


def test_values_clipped_and_masked_patches_drawn_in_a_colour_no_tissue_has(tmp_path):
    img = torch.full((1, 8, 8, 8), 2.0)       # clipped to 1 -> white
    recon = torch.full((1, 8, 8, 8), -1.0)    # clipped to 0 -> black
    mask = torch.ones(1, 8, 8, 8)             # everything removed -> MASK_COLOUR in row 2
    arr = save_reconstruction_figure(img, img, recon, str(tmp_path / "a.png"), mask=mask, cell=32)
    geo = grid_layout(32)
    centre = lambda r, c: arr[geo["rows"][r] + 16, geo["cols"][c] + 16]  # noqa: E731
    for c in range(3):
        assert tuple(centre(0, c)) == (255, 255, 255)
        assert tuple(centre(1, c)) == MASK_COLOUR
        assert tuple(centre(2, c)) == (0, 0, 0)


def test_masked_colour_differs_from_every_tissue_grey_and_only_masked_voxels_get_it(tmp_path):
    r, g, b = MASK_COLOUR
    assert max(abs(r - g), abs(g - b), abs(r - b)) > 100  # far from the grey line (tissue is drawn grey)
    img = torch.full((1, 16, 16, 16), 0.5)  # grey 128: what the old picture drew masked patches as
    mask = torch.zeros(1, 16, 16, 16)
    mask[..., :8] = 1                       # the left half (W < 8) removed
    arr = save_reconstruction_figure(img, img * (1 - mask), img, str(tmp_path / "m.png"), mask=mask, cell=32)
    geo = grid_layout(32)
    y, x = geo["rows"][1], geo["cols"][0]   # visible-patches row, axial [H, W]: left half masked
    cell = arr[y:y + 32, x:x + 32]
    assert (cell[:, :16] == MASK_COLOUR).all(axis=-1).all() and (cell[:, 16:] == 128).all()
    others = np.concatenate([arr[geo["rows"][k]:geo["rows"][k] + 32] for k in (0, 2)])
    assert not (others == MASK_COLOUR).all(axis=-1).any()  # input and reconstruction rows have no masked colour


def test_rows_are_titled_with_what_they_show():
    assert ROW_TITLES[0] == "input"
    assert "masked" in ROW_TITLES[1] and "magenta" in ROW_TITLES[1]
    assert "model output" in ROW_TITLES[2] and "pasted" in ROW_TITLES[2]  # not a bare "recon"


def test_long_title_is_wrapped_inside_the_picture(tmp_path):
    img = torch.rand(1, 8, 8, 8)
    title = "epoch 25/25  train loss 0.0310  held-out MSE 0.0123 (trivial 0.0250) " * 2
    arr = save_reconstruction_figure(img, img, img, str(tmp_path / "t.png"), cell=64, title=title)
    assert arr.shape[1] == grid_layout(64)["width"] and arr.shape[0] > grid_layout(64, 1)["height"]


def test_non_cubic_volume_gives_aligned_grid(tmp_path):
    vol = np.zeros((8, 32, 16), dtype=np.float32)
    vol[4] = 1.0  # the axial mid-slice (index D//2 = 4) is white
    arr = save_reconstruction_figure(vol[None], vol[None], vol[None], str(tmp_path / "b.png"), cell=64)
    assert arr.shape == _grid_shape(64)
    geo = grid_layout(64)
    y0, x0 = geo["rows"][0], geo["cols"][0]
    axial = arr[y0:y0 + 64, x0:x0 + 64]
    # axial [H=32, W=16] fills the full height, half the width, letterboxed left and right
    assert tuple(axial[32, 32]) == (255, 255, 255)
    assert tuple(axial[32, 2]) == BACKGROUND
    coronal = arr[y0:y0 + 64, geo["cols"][1]:geo["cols"][1] + 64]
    # coronal [D=8, W=16] -> 32 x 64 scaled; one white row (depth 4, flipped to row 3) among black rows
    col = coronal[:, 32, 0]
    assert set(col[:16].tolist()) == {BACKGROUND[0]} and (col == 255).sum() == 4


def test_mismatched_shapes_rejected(tmp_path):
    with pytest.raises(ValueError, match="one shape"):
        save_reconstruction_figure(torch.rand(1, 8, 8, 8), torch.rand(1, 8, 8, 4), torch.rand(1, 8, 8, 8),
                                   str(tmp_path / "c.png"))
