"""Boxes of fixed physical size around a point or a label's centroid, on real CT (util.volume.roi)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from util.errors import UserError
import util.volume.roi as roi
from util.volume.roi import extract_roi, extract_roi_labels, label_centroid, to_lps

ROI_MM, SIZE = (48.0, 48.0, 48.0), (24, 24, 24)
ORGANS = ("liver", "spleen", "leftkidney", "rightkidney")
ALL_ORGANS = ORGANS + ("leftlung", "rightlung", "bone")


@pytest.fixture(scope="module")
def ircad(shared_data):
    d = shared_data / "ircadb01"
    return sitk.ReadImage(str(d / "ct.nii.gz")), {o: sitk.ReadImage(str(d / f"mask_{o}.nii.gz")) for o in ORGANS}


def test_a_box_on_each_organ_centroid_is_mostly_that_organ(ircad):
    ct, masks = ircad
    for organ, mask in masks.items():
        centre = label_centroid(mask, 1, organ)
        labels = extract_roi_labels(mask, centre, ROI_MM, SIZE)
        hu = extract_roi(ct, centre, ROI_MM, SIZE)
        assert labels.shape == hu.shape == SIZE
        assert labels.mean() > 0.5, organ  # the box around the centroid is mostly the organ
        organ_hu = float(np.median(hu[labels == 1]))
        assert 0 < organ_hu < 250, (organ, organ_hu)  # soft tissue, not air, not bone


def test_the_same_point_on_lps_and_ras_copies_gives_the_same_box(ircad):
    ct, masks = ircad
    ras = sitk.DICOMOrient(ct, "RAS")
    assert ras.GetDirection() != ct.GetDirection()
    centre = label_centroid(masks["spleen"], 1)
    a = extract_roi(ct, centre, ROI_MM, SIZE)
    b = extract_roi(ras, centre, ROI_MM, SIZE)
    np.testing.assert_array_equal(a, b)  # the same bytes, not only close
    # the same point written in RAS coordinates (x, y negated) lands on the same box
    x, y, z = centre
    c = extract_roi(ras, to_lps((-x, -y, z), "RAS"), ROI_MM, SIZE)
    np.testing.assert_array_equal(a, c)
    for organ, mask in masks.items():  # and on the other organs, at another box size
        centre = label_centroid(mask, 1)
        np.testing.assert_array_equal(extract_roi(ct, centre, (50.0, 40.0, 30.0), (20, 16, 12)),
                                      extract_roi(ras, centre, (50.0, 40.0, 30.0), (20, 16, 12)), err_msg=organ)


def test_the_same_lesion_on_two_resamplings_gives_nearly_the_same_box(ircad):
    ct, masks = ircad
    centre = label_centroid(masks["leftkidney"], 1)
    fine = extract_roi(ct, centre, ROI_MM, SIZE)
    coarse_img = sitk.Resample(ct, [256, 256, 103], sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(),
                               [1.14, 1.14, 2.0], ct.GetDirection(), -1024.0, sitk.sitkFloat32)
    coarse = extract_roi(coarse_img, centre, ROI_MM, SIZE)
    r = np.corrcoef(fine.ravel(), coarse.ravel())[0, 1]
    assert r > 0.95, r
    assert np.median(np.abs(fine - coarse)) < 25.0


def test_a_box_leaving_the_scan_is_padded_with_air_and_a_point_outside_is_refused(ircad):
    ct, _ = ircad
    n = np.array(ct.GetSize())
    edge = np.array(ct.TransformContinuousIndexToPhysicalPoint([0.0, n[1] / 2, n[2] / 2]))
    box = extract_roi(ct, edge, ROI_MM, SIZE, fill=-1200.0)
    assert (box[:, :, :10] == -1200.0).all()  # the half beyond the first column is air at the window's low end
    assert (box[:, :, 14:] > -1100).mean() > 0.5  # the inner half is the scan
    outside = edge - np.array([30.0, 0, 0])
    with pytest.raises(UserError, match=r"ct\.nii\.gz: the ROI centre .* outside the scan"):
        extract_roi(ct, outside, ROI_MM, SIZE, name="ct.nii.gz")


def test_a_missing_label_is_named(ircad):
    _, masks = ircad
    with pytest.raises(UserError, match=r"no voxel with label 7 .*labels present: \[0, 1\]"):
        label_centroid(masks["liver"], 7, "mask_liver.nii.gz")


def test_totalseg_label_map_centroids_in_a_ras_scan(shared_data):
    d = shared_data / "totalseg"
    ct, seg = sitk.ReadImage(str(d / "example_ct_sm.nii.gz")), sitk.ReadImage(str(d / "example_seg.nii.gz"))
    names = json.loads((d / "total_v2_class_map.json").read_text())
    present = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(seg)) if v]
    big = sorted(present, key=lambda v: -(sitk.GetArrayViewFromImage(seg) == v).sum())[:3]
    for label in big:
        centre = label_centroid(seg, label)
        labels = extract_roi_labels(seg, centre, (30.0, 30.0, 30.0), (16, 16, 16))
        assert (labels == label).mean() > 0.3, names.get(str(label), label)
        assert extract_roi(ct, centre, (30.0, 30.0, 30.0), (16, 16, 16)).shape == (16, 16, 16)


def _points(shared_data) -> list[tuple[str, sitk.Image, np.ndarray]]:
    """(name, scan, LPS point): the centroids of the seven IRCAD organ masks, of the three largest TotalSegmentator
    labels (RAS scan, int32 voxels), and three points of the DICOM series."""
    d, ts = shared_data / "ircadb01", shared_data / "totalseg"
    ct = sitk.ReadImage(str(d / "ct.nii.gz"))
    out = [(o, ct, label_centroid(sitk.ReadImage(str(d / f"mask_{o}.nii.gz")), 1)) for o in ALL_ORGANS]
    tct, seg = sitk.ReadImage(str(ts / "example_ct.nii.gz")), sitk.ReadImage(str(ts / "example_seg.nii.gz"))
    labels = np.unique(sitk.GetArrayViewFromImage(seg))[1:]
    big = sorted(labels, key=lambda v: -(sitk.GetArrayViewFromImage(seg) == v).sum())[:3]
    out += [(f"totalseg_{v}", tct, label_centroid(seg, int(v))) for v in big]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ts / "example_ct_dicom")))
    dicom = reader.Execute()
    out += [(f"dicom_{k}", dicom, np.array(dicom.TransformContinuousIndexToPhysicalPoint(i)))
            for k, i in enumerate(([256.0, 256.0, 10.3], [120.3, 300.7, 3.2], [500.0, 20.0, 18.5]))]
    return out


@pytest.mark.parametrize("interpolator", ["bspline", "linear"])
def test_boxes_through_the_separable_resampler_are_simpleitks_boxes(shared_data, monkeypatch, interpolator):
    """Issue 34: the same crops as SimpleITK (within 1e-3 of the crop's value range; measured ~5e-4 HU) on every
    real CT here, boxes inside and across the scan's faces, and SimpleITK is not called for them."""
    points = _points(shared_data)
    sizes = ((48.0, 48.0, 48.0), (24, 24, 24)), ((50.0, 40.0, 64.0), (64, 32, 48))
    reference = {(name, k): extract_roi(img, p, mm, n, interpolator=interpolator, backend="sitk")
                 for name, img, p in points for k, (mm, n) in enumerate(sizes)}

    def no_sitk(*args, **kwargs):
        raise AssertionError("SimpleITK resampled a box of an axis-aligned scan")

    monkeypatch.setattr(roi, "resample_sitk", no_sitk)
    for name, img, p in points:
        for k, (mm, n) in enumerate(sizes):
            ours, theirs = extract_roi(img, p, mm, n, interpolator=interpolator), reference[(name, k)]
            assert ours.shape == theirs.shape == n and ours.dtype == np.float32
            np.testing.assert_array_equal(ours == -1200.0, theirs == -1200.0)  # the same air outside the scan
            span = float(theirs.max() - theirs.min())
            assert np.abs(ours - theirs).max() <= 1e-3 * span, (name, k)


def test_a_box_whose_voxels_lie_on_the_scans_face_is_left_to_simpleitk(shared_data):
    """2 mm voxels on 2 mm slices, centred on a slice: box voxels sit exactly on the scan's outer face, where
    SimpleITK's own rounding decides inside or outside; that box is SimpleITK's, byte for byte."""
    dicom = [img for name, img, _ in _points(shared_data) if name == "dicom_0"][0]
    centre = np.array(dicom.TransformContinuousIndexToPhysicalPoint([256.0, 256.0, 10.0]))
    ref = roi.roi_grid(centre, (48.0, 48.0, 48.0), (24, 24, 24))
    assert roi._box_separable(dicom, ref, *roi._covering_region(dicom, ref), "bspline", -1200.0) is None
    np.testing.assert_array_equal(extract_roi(dicom, centre, (48.0, 48.0, 48.0), (24, 24, 24)),
                                  extract_roi(dicom, centre, (48.0, 48.0, 48.0), (24, 24, 24), backend="sitk"))


def test_an_oblique_scan_or_another_interpolator_still_goes_through_simpleitk(shared_data):
    ct = sitk.ReadImage(str(shared_data / "ircadb01" / "ct.nii.gz"))[150:350, 150:350, 30:90]
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint([100.0, 100.0, 30.0]))
    rot = np.array([[np.cos(0.2), -np.sin(0.2), 0], [np.sin(0.2), np.cos(0.2), 0], [0, 0, 1]])
    oblique = sitk.Image(ct)
    oblique.SetDirection(rot.ravel().tolist())
    oblique.SetOrigin((centre - rot @ (np.array([100.0, 100.0, 30.0]) * ct.GetSpacing())).tolist())
    for img, interp in ((oblique, "bspline"), (ct, "nearest"), (ct, "lanczos")):
        a = extract_roi(img, centre, (30.0, 30.0, 30.0), (12, 12, 12), interpolator=interp)
        b = extract_roi(img, centre, (30.0, 30.0, 30.0), (12, 12, 12), interpolator=interp, backend="sitk")
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="backend"):
        extract_roi(ct, centre, (30.0, 30.0, 30.0), (12, 12, 12), backend="torch")
