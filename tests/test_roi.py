"""Boxes of fixed physical size around a point or a label's centroid, on real CT (util.volume.roi)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from util.errors import UserError
from util.volume.roi import extract_roi, extract_roi_labels, label_centroid, to_lps

ROI_MM, SIZE = (48.0, 48.0, 48.0), (24, 24, 24)
ORGANS = ("liver", "spleen", "leftkidney", "rightkidney")


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
    np.testing.assert_allclose(a, b, atol=1e-3)
    # the same point written in RAS coordinates (x, y negated) lands on the same box
    x, y, z = centre
    c = extract_roi(ras, to_lps((-x, -y, z), "RAS"), ROI_MM, SIZE)
    np.testing.assert_allclose(a, c, atol=1e-3)


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
    n, s = np.array(ct.GetSize()), np.array(ct.GetSpacing())
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
