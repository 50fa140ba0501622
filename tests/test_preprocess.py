"""Reading, reorientation, resampling and windowing of CT volumes (datasets_three_d)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from util.volume.io import VolumeError, read_image
from util.volume.preprocess import (PreprocessConfig, load_volume, load_volume_and_mask, preprocess_image, preprocess_mask,
                                    to_input_grid)
from datasets_three_d_fine import resample_to_256
from tests.bad_inputs import build_bad_files
from util.errors import UserError


def image(arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    """[D, H, W] array -> sitk image with (x, y, z) spacing/origin."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def physical_box(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Min / max physical corners (mm) of the voxel boxes."""
    n = img.GetSize()
    pts = [img.TransformContinuousIndexToPhysicalPoint([(c >> k & 1) * n[k] - 0.5 for k in range(3)])
           for c in range(8)]
    return np.min(pts, 0), np.max(pts, 0)


def reoriented_copy(img: sitk.Image, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> sitk.Image:
    """The same physical image stored with new axis k = old axis perm[k] (reversed where flips[k])."""
    arr = sitk.GetArrayFromImage(img)  # numpy axis j <-> sitk axis 2 - j
    new = np.transpose(arr, [2 - perm[2 - j] for j in range(3)])
    for k in range(3):
        if flips[k]:
            new = np.flip(new, axis=2 - k)
    out = sitk.GetImageFromArray(np.ascontiguousarray(new))
    d = np.array(img.GetDirection()).reshape(3, 3)
    out.SetDirection(np.stack([d[:, perm[k]] * (-1 if flips[k] else 1) for k in range(3)], 1).ravel().tolist())
    out.SetSpacing([img.GetSpacing()[perm[k]] for k in range(3)])
    corner = [0, 0, 0]
    for k in range(3):
        if flips[k]:
            corner[perm[k]] = img.GetSize()[perm[k]] - 1
    out.SetOrigin(img.TransformIndexToPhysicalPoint(corner))
    return out


def test_window_maps_hu_to_unit_range_in_float32():
    hu = np.array([-1200, 800, -200, -5000, 3000, 0], np.int16).reshape(6, 1, 1) * np.ones((1, 2, 2), np.int16)
    arr, _ = preprocess_image(image(hu), PreprocessConfig(size=None))
    assert arr.dtype == np.float32 and arr.shape == (6, 2, 2)
    np.testing.assert_allclose(arr[:, 0, 0], [0.0, 1.0, 0.5, 0.0, 1.0, 0.6], atol=1e-6)
    arr, _ = preprocess_image(image(hu.astype(np.float32)), PreprocessConfig(size=None, window=(-1000, 1000)))
    np.testing.assert_allclose(arr[:, 0, 0], [0.0, 0.9, 0.4, 0.0, 1.0, 0.5], atol=1e-6)


def test_resample_to_size_keeps_the_physical_box():
    img = image(np.zeros((10, 20, 30), np.int16), spacing=(0.7, 1.3, 2.5), origin=(10.0, -5.0, 3.0))
    arr, ref = preprocess_image(img, PreprocessConfig(size=(16, 24, 12)))
    assert arr.shape == (16, 24, 12) and ref.GetSize() == (12, 24, 16)
    np.testing.assert_allclose(ref.GetSpacing(), [0.7 * 30 / 12, 1.3 * 20 / 24, 2.5 * 10 / 16], rtol=1e-9)
    for a, b in zip(physical_box(ref), physical_box(img)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_resample_to_spacing_pads_to_size_and_never_crops():
    img = image(np.full((10, 20, 30), 40, np.int16), spacing=(1.0, 1.0, 3.0), origin=(5.0, 6.0, 7.0))
    cfg = PreprocessConfig(size=(16, 16, 16), spacing=(2.0, 2.0, 2.0), interpolator="linear")
    arr, ref = preprocess_image(img, cfg)
    assert ref.GetSpacing() == (2.0, 2.0, 2.0) and arr.shape == (16, 16, 16)  # 15x10x15 padded up to 16
    centre = lambda im: np.mean(physical_box(im), axis=0)  # noqa: E731
    np.testing.assert_allclose(centre(ref), centre(img), atol=1e-6)
    assert arr[:, 0, :].max() == 0.0 and np.isclose(arr[8, 8, 8], 1240 / 2000, atol=1e-6)  # pad = window minimum
    big, _ = preprocess_image(img, PreprocessConfig(size=(4, 4, 4), spacing=(1.0, 1.0, 1.0), interpolator="nearest"))
    assert big.shape == (30, 20, 30)


def test_bspline_resampling_has_no_border_artefacts():
    img = image(np.full((7, 9, 11), 100, np.int16), spacing=(2.0, 1.0, 3.0))
    arr, _ = preprocess_image(img, PreprocessConfig(size=(13, 5, 17)))
    np.testing.assert_allclose(arr, 1300 / 2000, atol=1e-5)


def cube_phantom(shape=(20, 30, 40), lo=(6, 8, 10), hi=(12, 20, 26)) -> tuple[np.ndarray, np.ndarray]:
    hu = np.full(shape, -1000, np.int16)
    mask = np.zeros(shape, np.uint8)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    hu[sl], mask[sl] = 300, 1
    return hu, mask


def test_mask_lands_on_the_bright_cube_even_when_stored_in_another_orientation(tmp_path):
    hu, mask = cube_phantom()
    img = image(hu, spacing=(1.5, 1.0, 3.0), origin=(-20.0, 4.0, 100.0))
    sitk.WriteImage(img, str(tmp_path / "img.nii.gz"))
    sitk.WriteImage(reoriented_copy(image(mask, (1.5, 1.0, 3.0), (-20.0, 4.0, 100.0)), (1, 0, 2), (True, False, True)),
                    str(tmp_path / "mask.nii.gz"))
    arr, m = load_volume_and_mask(str(tmp_path / "img.nii.gz"), str(tmp_path / "mask.nii.gz"),
                                  PreprocessConfig(size=(24, 24, 24)))
    assert m.dtype == np.int64 and m.shape == arr.shape == (24, 24, 24) and set(np.unique(m)) == {0, 1}
    bright = arr > 0.5
    dice = 2 * (bright & (m > 0)).sum() / (bright.sum() + (m > 0).sum())
    assert dice > 0.9 and arr[m > 0].mean() > 0.65 and arr[m == 0].mean() < 0.15


def test_totalseg_dicom_series_and_its_las_label_map_pair_the_right_voxels(shared_data):
    ts = shared_data / "totalseg"
    img = read_image(ts / "example_ct_dicom")
    assert img.GetSize() == (512, 512, 20)
    seg = read_image(ts / "example_seg_dicom.nii.gz")
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(seg.GetDirection()) == "LAS"
    arr, ref = preprocess_image(img, PreprocessConfig(size=None))
    m = preprocess_mask(seg, ref)
    naive = sitk.GetArrayFromImage(seg)  # ignores the direction cosines: A-P reversed
    assert np.array_equal(m, naive[:, ::-1, :]) and not np.array_equal(m, naive)
    hu = arr * 2000 - 1200
    assert (hu[m > 0] > -500).mean() > 0.95 and (hu[naive > 0] > -500).mean() < 0.8
    classes = json.loads((ts / "total_v2_class_map.json").read_text())
    liver, t12 = (int(k) for k in ("5", "32"))
    assert classes["5"] == "liver" and classes["32"] == "vertebrae_T12"
    assert 20 < hu[m == liver].mean() < 200 and hu[m == t12].mean() > 150
    assert hu[naive == liver].mean() < 0 and hu[naive == t12].mean() < 0
    small, ref = preprocess_image(img, PreprocessConfig(size=(10, 64, 64), interpolator="linear"))
    ms = preprocess_mask(seg, ref)
    assert ms.shape == (10, 64, 64) and 20 < (small[ms == liver] * 2000 - 1200).mean() < 200


@pytest.mark.parametrize("perm,flips,name", [((0, 1, 2), (True, True, False), "RAS"),
                                             ((0, 1, 2), (False, True, False), "LAS"),
                                             ((2, 0, 1), (False, True, False), "SRP")])
def test_ircad_stored_in_other_orientations_loads_to_identical_tensors(shared_data, tmp_path, perm, flips, name):
    ct = read_image(shared_data / "ircadb01" / "ct.nii.gz")[192:320, 192:320, 40:80]
    copy = reoriented_copy(ct, perm, flips)
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(copy.GetDirection()) == name
    sitk.WriteImage(ct, str(tmp_path / "lps.nii.gz"))
    sitk.WriteImage(copy, str(tmp_path / "other.nii.gz"))
    cfg = PreprocessConfig(size=(20, 48, 48))
    a, b = load_volume(str(tmp_path / "lps.nii.gz"), cfg), load_volume(str(tmp_path / "other.nii.gz"), cfg)
    raw, raw_copy = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(copy)
    assert raw.shape != raw_copy.shape or not np.array_equal(raw, raw_copy)  # stored differently on disk
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a.std() > 0.05


@pytest.mark.parametrize("kind,expect", [("missing", "not found"), ("truncated", "truncated"),
                                         ("not_an_image", "not a readable image"), ("2d", "2D"), ("4d", "4D"),
                                         ("one_slice", "at least 2 voxels"), ("nan", "NaN"), ("inf", "infinite"),
                                         ("absurd", "voxels")])
def test_bad_volumes_raise_one_sentence_starting_with_the_path(tmp_path, kind, expect):
    path = str(build_bad_files(tmp_path)[kind])
    with pytest.raises(VolumeError, match=expect) as e:
        load_volume(path, PreprocessConfig(size=(16, 16, 16)))
    msg = str(e.value)
    assert msg.startswith(path) and msg.endswith(".") and "\n" not in msg and msg.count(". ") == 0


def test_nan_in_other_formats_and_a_single_dicom_slice_are_refused(shared_data, tmp_path):
    arr = np.zeros((4, 5, 6), np.float32)
    arr[1, 2, 3] = np.nan
    sitk.WriteImage(image(arr), str(tmp_path / "nan.nrrd"))
    with pytest.raises(VolumeError, match="NaN"):
        load_volume(str(tmp_path / "nan.nrrd"), PreprocessConfig(size=None))
    one = sorted((shared_data / "totalseg" / "example_ct_dicom").iterdir())[0]
    with pytest.raises(VolumeError, match="folder that holds the series"):
        read_image(one)


def test_nrrd_and_mha_read_like_nifti(tmp_path):
    hu, _ = cube_phantom()
    img = image(hu, spacing=(1.5, 1.0, 3.0))
    out = []
    for ext in ("nii", "nii.gz", "nrrd", "mha"):
        sitk.WriteImage(img, str(tmp_path / f"v.{ext}"))
        out.append(load_volume(str(tmp_path / f"v.{ext}"), PreprocessConfig(size=(8, 8, 8))))
    assert all(np.array_equal(out[0], o) for o in out[1:])


def test_config_round_trips_and_keys_change_with_settings():
    cfg = PreprocessConfig(size=64, spacing=(1.5, 1, 1), window=(-1000, 400))
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d and d["size"] == [64, 64, 64]
    back = PreprocessConfig.from_dict(d)
    assert back == cfg and back.key() == cfg.key() and back.size == (64, 64, 64)
    assert PreprocessConfig(size=64).key() != cfg.key() and len(cfg.key()) == 16
    for bad, flag in ((dict(orientation="LLS"), "--orientation"), (dict(size=(0, 4, 4)), "--input_size"),
                      (dict(window=(5, 1)), "--window"), (dict(interpolator="cubic"), "--interpolator")):
        with pytest.raises(UserError, match=flag):  # one sentence naming the flag that sets the field
            PreprocessConfig(**bad)
    with pytest.raises(ValueError, match="unknown keys"):
        PreprocessConfig.from_dict({**d, "zoom": 2})


def test_label_map_goes_back_onto_the_original_grid():
    hu, mask = cube_phantom()
    img = reoriented_copy(image(hu, spacing=(1.5, 1.0, 3.0), origin=(3.0, 2.0, 1.0)), (0, 1, 2), (True, True, False))
    arr, ref = preprocess_image(img, PreprocessConfig(size=(16, 16, 16)))
    back = to_input_grid((arr > 0.5).astype(np.uint8), ref, img)
    for g in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(back, g)() == getattr(img, g)()
    got, want = sitk.GetArrayFromImage(back) > 0, sitk.GetArrayFromImage(img) > 0
    assert 2 * (got & want).sum() / (got.sum() + want.sum()) > 0.85


def test_resample_to_256_keeps_the_extent():
    lab = image(np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6), spacing=(2.0, 1.0, 4.0), origin=(1.0, 2.0, 3.0))
    out = resample_to_256(lab, is_mask=True)
    assert out.GetSize() == (256,) * 3 and out.GetPixelID() == sitk.sitkUInt8
    for a, b in zip(physical_box(out), physical_box(lab)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert set(np.unique(sitk.GetArrayViewFromImage(out))) == set(range(120))


def test_a_whole_volume_config_is_saved_as_before_the_roi_fields_so_older_runs_resume():
    """Checkpoints of earlier versions hold these six keys; the recipe check compares the dicts, so a config
    without an ROI must give exactly them (with the ROI keys present every older run refused to resume)."""
    old = {"orientation": "LPS", "size": [64, 64, 64], "spacing": None, "window": [-1200.0, 800.0],
           "interpolator": "bspline", "mask_interpolator": "nearest"}
    cfg = PreprocessConfig(size=(64, 64, 64))
    assert cfg.to_dict() == old
    assert PreprocessConfig.from_dict(old) == cfg
    roi = cfg.with_overrides(roi_mm=(50, 50, 50), roi_coords="RAS")
    assert roi.to_dict()["roi_mm"] == [50.0, 50.0, 50.0] and roi.to_dict()["roi_coords"] == "RAS"
    assert PreprocessConfig.from_dict(roi.to_dict()) == roi
