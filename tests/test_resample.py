"""util/volume/resample.py: the separable (matmul) resampler against SimpleITK's ResampleImageFilter, on real CTs.

Every comparison runs `resample_centered` twice on the same grid, backend="sitk" (the reference) and
backend="auto", checks that "auto" really took the separable path, and compares voxels and geometry.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import util.volume.resample as rs
from util.volume.resample import SITK_INTERPOLATORS, axis_operator, resample_centered, resample_separable

TOL = {"bspline": 2e-3, "linear": 1e-5}  # max abs difference (HU) allowed against SimpleITK
DEFAULT = -1200.0


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of resample_separable made by resample_centered."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(args[0].shape)
        return resample_separable(*args, **kwargs)

    monkeypatch.setattr(rs, "resample_separable", wrapped)
    return calls


def _float(img: sitk.Image) -> sitk.Image:
    return sitk.Cast(img, sitk.sitkFloat32)


@pytest.fixture(scope="module")
def images(shared_data) -> dict[str, sitk.Image]:
    """The real CTs as float32 (as the project resamples them), whole and cropped to keep sitk fast."""
    ircad = _float(sitk.ReadImage(str(shared_data / "ircadb01" / "ct.nii.gz")))
    ts = _float(sitk.ReadImage(str(shared_data / "totalseg" / "example_ct.nii.gz")))  # RAS, 3 mm, int32 on disk
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(shared_data / "totalseg" / "example_ct_dicom")))
    dicom = _float(reader.Execute())
    oblique = ircad[200:264, 180:244, 50:82]
    rot = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])
    oblique.SetDirection((rot @ np.array([[1, 0, 0], [0, 0.8, -0.6], [0, 0.6, 0.8]])).ravel().tolist())
    return {"ircad": ircad, "ircad_crop": ircad[96:224, 160:288, 40:88], "ts_ras": ts[30:90, 20:80, 30:80],
            "ts_lps": sitk.DICOMOrient(ts, "LPS")[30:90, 20:80, 30:80], "dicom": dicom,
            "dicom_crop": dicom[128:384, 128:384, :], "oblique": oblique}


def _grid(img: sitk.Image, mode, arg) -> tuple[list[int], list[float]]:
    """Output (size, spacing): "size" keeps the physical extent; "spacing" = rint(n*s/s1) + padding (voxels)."""
    n, s = np.array(img.GetSize()), np.array(img.GetSpacing())
    if mode == "size":
        return [int(v) for v in arg], (s * n / np.array(arg)).tolist()
    s1 = s if arg[0] == "same" else np.array(arg[0], float)
    return (np.maximum(np.rint(n * s / s1), 1).astype(int) + arg[1]).tolist(), s1.tolist()


def _compare(img: sitk.Image, size, spacing, kind: str, spy: list) -> float:
    """Separable vs SimpleITK on one grid: same geometry and default voxels, max abs difference within TOL."""
    ref = resample_centered(img, size, spacing, kind, DEFAULT, backend="sitk")
    n_calls = len(spy)
    out = resample_centered(img, size, spacing, kind, DEFAULT)
    assert len(spy) == n_calls + 1, "the separable path was not used"
    assert out.GetSize() == ref.GetSize() and out.GetPixelID() == ref.GetPixelID() == sitk.sitkFloat32
    for g in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(out, g)() == getattr(ref, g)(), g
    a, b = sitk.GetArrayViewFromImage(ref), sitk.GetArrayViewFromImage(out)
    np.testing.assert_array_equal(b == np.float32(DEFAULT), a == np.float32(DEFAULT))  # same padded voxels
    diff = float(np.abs(a.astype(np.float64) - b).max())
    assert diff <= TOL[kind], f"{kind}: max |separable - sitk| = {diff} HU"
    return diff


CASES = {  # name: (image, mode, size or (spacing | "same", padding))
    "ircad_crop-size_down": ("ircad_crop", "size", (80, 72, 30)),
    "ircad_crop-size_up": ("ircad_crop", "size", (160, 176, 100)),
    "ircad_crop-spacing_pad": ("ircad_crop", "spacing", ((0.8, 0.8, 0.8), (9, 6, 5))),
    "ircad_crop-same_spacing_odd_pad": ("ircad_crop", "spacing", ("same", (7, 5, 3))),  # voxels on the edges
    "ts_ras-size_down": ("ts_ras", "size", (41, 37, 29)),
    "ts_ras-spacing_up_pad": ("ts_ras", "spacing", ((1.3, 1.7, 1.1), (8, 3, 5))),
    "ts_lps-size_up": ("ts_lps", "size", (130, 90, 120)),
    "ts_lps-spacing_pad": ("ts_lps", "spacing", ((2.0, 2.0, 2.0), (5, 5, 9))),
    "dicom-size_down": ("dicom", "size", (256, 256, 10)),
    "dicom_crop-spacing_1mm_pad": ("dicom_crop", "spacing", ((1.0, 1.0, 1.0), (6, 6, 8))),
    "dicom_crop-spacing_pad": ("dicom_crop", "spacing", ((0.78125, 0.78125, 1.6), (7, 7, 7))),
    "oblique-size_down": ("oblique", "size", (48, 40, 24)),
}


@pytest.mark.parametrize("kind", ["bspline", "linear"])
@pytest.mark.parametrize("case", list(CASES))
def test_separable_matches_sitk(images, spy, case, kind):
    name, mode, arg = CASES[case]
    size, spacing = _grid(images[name], mode, arg)
    _compare(images[name], size, spacing, kind, spy)


def test_whole_ircad_to_256_cubed_matches_sitk(images, spy):
    """The TANGERINE setting: the whole 512x512x129 CT to 256^3, keeping its extent."""
    size, spacing = _grid(images["ircad"], "size", (256, 256, 256))
    assert _compare(images["ircad"], size, spacing, "bspline", spy) <= TOL["bspline"]


def test_padding_is_the_default_value_exactly(images):
    img = images["ts_lps"]
    size, spacing = _grid(img, "spacing", ((2.5, 2.5, 2.5), (12, 12, 12)))
    arr = sitk.GetArrayFromImage(resample_centered(img, size, spacing, "bspline", DEFAULT))
    assert np.all(arr[:6] == np.float32(DEFAULT)) and np.all(arr[-6:] == np.float32(DEFAULT))
    assert np.all(arr[:, :, :6] == np.float32(DEFAULT)) and np.all(arr[:, :, -6:] == np.float32(DEFAULT))
    assert (arr[6:-6, 6:-6, 6:-6] != np.float32(DEFAULT)).all()


@pytest.mark.parametrize("interpolator", ["nearest", "lanczos", "label_gaussian"])
def test_other_interpolators_and_label_maps_go_through_sitk(shared_data, images, spy, interpolator):
    seg = sitk.ReadImage(str(shared_data / "totalseg" / "example_seg.nii.gz"))[40:64, 30:54, 5:25]  # uint8 labels
    ct = images["ts_ras"][10:30, 10:30, 10:30]  # small: lanczos costs ~1000 taps per voxel in SimpleITK
    int_ct = sitk.Cast(ct, sitk.sitkInt16)
    for img, default, kind in ((ct, DEFAULT, interpolator), (seg, 0.0, interpolator), (int_ct, 0.0, interpolator),
                               (int_ct, 0.0, "bspline")):  # non-float images: SimpleITK even for bspline
        size, spacing = _grid(img, "spacing", ((2.2, 1.9, 2.6), (3, 3, 3)))
        out = resample_centered(img, size, spacing, kind, default)
        ref = resample_centered(img, size, spacing, kind, default, backend="sitk")
        assert out.GetPixelID() == ref.GetPixelID() == img.GetPixelID()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(ref))
    assert spy == []


def test_an_axis_of_two_voxels_is_separable_repeatable_and_matches_the_guarded_sitk_path(images, spy):
    """ITK's B-spline reads outside an axis of length 2 (issue 29: a 106 x 103 x 2 volume gave a different array on
    every load, NaN at times). Both paths now compute the well-defined N = 2 mirror spline, identically on every run."""
    img = images["ircad_crop"][:40, :30, 10:12]
    for size, spacing in (((20, 20, 5), (1.0, 1.0, 0.7)), ((32, 32, 32), (40 * 0.57 / 32, 30 * 0.57 / 32, 3.2 / 32))):
        runs = [sitk.GetArrayFromImage(resample_centered(img, size, spacing, "bspline", DEFAULT, backend=b))
                for b in ("sitk", "auto", "sitk", "auto")]
        assert all(np.isfinite(r).all() for r in runs)
        np.testing.assert_array_equal(runs[0], runs[2])
        np.testing.assert_array_equal(runs[1], runs[3])
        _compare(img, size, spacing, "bspline", spy)
        _compare(img, size, spacing, "linear", spy)


def test_itk_reads_outside_a_two_voxel_axis_and_resample_sitk_does_not():
    """The cause, probed directly: ITK mirrors tap index 3 of a 2-voxel axis to -1 (before the buffer), so between
    the last voxel centre and the edge its weights are not the mirror spline's; `resample_sitk` gives them."""
    x = np.arange(-0.5, 1.5, 0.125)
    op, _ = axis_operator(2, len(x), -0.5, 0.125, "bspline")
    geometry = {"Spacing": (0.125, 1.0, 1.0), "Origin": (-0.5, 0.0, 0.0), "Direction": np.eye(3).ravel().tolist()}
    raw, guarded = [], []
    for j in range(2):
        a = np.zeros((1, 1, 2))
        a[0, 0, j] = 1.0
        img = sitk.GetImageFromArray(a)
        f = rs._with_geometry(sitk.ResampleImageFilter(), geometry, "SetOutput")
        f.SetSize([len(x), 1, 1])
        f.SetInterpolator(sitk.sitkBSpline)
        f.SetOutputPixelType(sitk.sitkFloat64)
        raw.append(sitk.GetArrayFromImage(f.Execute(img))[0, 0])
        guarded.append(sitk.GetArrayFromImage(rs.resample_sitk(img, (len(x), 1, 1), geometry, "bspline", 0.0,
                                                               sitk.sitkFloat64))[0, 0])
    raw, guarded = np.stack(raw, 1), np.stack(guarded, 1)
    np.testing.assert_allclose(guarded, op, rtol=0, atol=1e-12)
    past = x > 1.0
    np.testing.assert_allclose(raw[~past], op[~past], rtol=0, atol=1e-12)  # up to the last centre ITK is right
    assert not np.allclose(raw[past], op[past], rtol=0, atol=1e-6)  # beyond it, it reads outside the axis


@pytest.mark.parametrize("kind", ["bspline", "linear"])
@pytest.mark.parametrize("n", [1, 3, 4, 9])
def test_axis_operator_is_itks_operator(kind, n):
    """Probing ITK with unit impulses gives its 1-D operator; the grid hits -0.5 and N - 0.5 exactly."""
    x = np.arange(-0.75, n - 0.24, 0.25)  # -0.75 (out), -0.5 (in), ..., n - 0.5 (out), n - 0.25 (out)
    cols = []
    for j in range(n):
        a = np.zeros((1, 1, n))
        a[0, 0, j] = 1.0
        f = sitk.ResampleImageFilter()
        f.SetSize([len(x), 1, 1])
        f.SetOutputOrigin([float(x[0]), 0.0, 0.0])
        f.SetOutputSpacing([0.25, 1.0, 1.0])
        f.SetInterpolator(SITK_INTERPOLATORS[kind])
        f.SetDefaultPixelValue(np.nan)  # marks the outside points
        f.SetOutputPixelType(sitk.sitkFloat64)
        cols.append(sitk.GetArrayFromImage(f.Execute(sitk.GetImageFromArray(a)))[0, 0])
    itk = np.stack(cols, 1)
    op, inside = axis_operator(n, len(x), -0.75, 0.25, kind)
    np.testing.assert_array_equal(inside, ~np.isnan(itk[:, 0]))
    assert inside[1] and not inside[0] and not inside[-2]  # [-0.5, N - 0.5)
    np.testing.assert_allclose(op[inside], itk[inside], rtol=0, atol=1e-9)


def test_bspline_operator_interpolates_and_keeps_constants():
    op, inside = axis_operator(50, 50, 0.0, 1.0, "bspline")
    np.testing.assert_allclose(op, np.eye(50), atol=1e-12)
    op, _ = axis_operator(50, 77, -0.4, 0.63, "bspline")
    np.testing.assert_allclose(op.sum(1), 1.0, atol=1e-12)


@pytest.mark.parametrize("z_first", [False, True])
def test_resample_separable_is_the_tensor_product(monkeypatch, z_first):
    """Both axis orders give A_z (x) A_y (x) A_x applied to the array; outside voxels get the default."""
    monkeypatch.setattr(rs, "_z_first", lambda *a: z_first)
    arr = np.random.default_rng(0).normal(size=(9, 14, 11)).astype(np.float32) * 500
    s0, n1, s1, off = (2.0, 0.8, 1.1), (12, 9, 13), (1.4, 1.3, 0.9), (-3.1, 0.5, -0.2)
    out = resample_separable(arr, s0, n1, s1, off, "bspline", DEFAULT)
    ops = [axis_operator(arr.shape[k], n1[k], off[k] / s0[k], s1[k] / s0[k], "bspline") for k in range(3)]
    ref = np.einsum("zyx,az,by,cx->abc", arr.astype(np.float64), ops[0][0], ops[1][0], ops[2][0])
    mask = ops[0][1][:, None, None] & ops[1][1][None, :, None] & ops[2][1][None, None, :]
    assert out.dtype == np.float32 and out.shape == n1 and 0 < mask.sum() < mask.size
    np.testing.assert_allclose(out[mask], ref[mask], rtol=0, atol=1e-3)
    assert np.all(out[~mask] == np.float32(DEFAULT))
    np.testing.assert_array_equal(resample_separable(arr, s0, n1, s1, off, "bspline", DEFAULT, device="cpu"), out)
    assert np.all(resample_separable(arr, s0, n1, s1, (100.0, 0, 0), "linear", 7.0) == 7.0)  # all outside


def test_interpolator_constants_and_bad_arguments(images):
    img = images["ts_ras"]
    a = resample_centered(img, (20, 20, 20), (5.0, 5.0, 5.0), sitk.sitkBSpline, DEFAULT)
    b = resample_centered(img, (20, 20, 20), (5.0, 5.0, 5.0), "bspline", DEFAULT)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    with pytest.raises(ValueError, match="interpolator"):
        resample_centered(img, (20, 20, 20), (5.0, 5.0, 5.0), "cubic")
    with pytest.raises(ValueError, match="backend"):
        resample_centered(img, (20, 20, 20), (5.0, 5.0, 5.0), "linear", backend="torch")
    with pytest.raises(ValueError, match="kind"):
        axis_operator(4, 4, 0.0, 1.0, "nearest")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_matches_cpu(images):
    img = images["ircad_crop"]
    size, spacing = _grid(img, "spacing", ((0.8, 0.8, 0.8), (9, 6, 5)))
    cpu = sitk.GetArrayFromImage(resample_centered(img, size, spacing, "bspline", DEFAULT))
    gpu = sitk.GetArrayFromImage(resample_centered(img, size, spacing, "bspline", DEFAULT, device="cuda"))
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-4)


@pytest.mark.parametrize("interpolator,tol_hu", [("bspline", 2e-3), ("linear", 1e-5)])
def test_preprocessing_the_stored_int16_ct_matches_the_simpleitk_path(shared_data, interpolator, tol_hu):
    """preprocess_image resamples straight from the stored int16 (no cast); the result is SimpleITK's."""
    from util.volume.preprocess import PreprocessConfig, preprocess_image

    ct = sitk.ReadImage(str(shared_data / "ircadb01" / "ct.nii.gz"))[100:356, 120:376, 20:100]
    assert ct.GetPixelID() == sitk.sitkInt16
    for cfg in (PreprocessConfig(size=(40, 96, 96), interpolator=interpolator),
                PreprocessConfig(size=(48, 160, 160), spacing=(2.0, 1.5, 1.5), interpolator=interpolator)):
        ours, ref = preprocess_image(ct, cfg)
        theirs, ref2 = preprocess_image(ct, cfg, backend="sitk")
        assert ours.shape == theirs.shape and ref.GetSize() == ref2.GetSize() and ref.GetOrigin() == ref2.GetOrigin()
        assert np.abs(ours - theirs).max() * 2000 <= tol_hu  # [0, 1] over a 2000 HU window
