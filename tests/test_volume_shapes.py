"""Odd volume shapes give the same bytes on every load, in this process and in fresh ones, and finite values
(issue 29: a 106 x 103 x 2 volume gave four different arrays in four loads, NaN at 32^3).

The cause was ITK's cubic B-spline reading outside an axis of 2 voxels (memory before its coefficient buffer,
different in every process and at every call). Every path that resamples is loaded here several times: 1, 2 and 3
voxels along each axis, every shape with 1-4 voxels per axis, up- and downsampling, size and spacing modes, native
grids, B-spline / linear / nearest (and lanczos, label Gaussian on a few), the separable and the SimpleITK
backends, lesion boxes inside and across the scan's edge, and label maps. Uninitialised memory differs between
processes, so the digests are also computed in two fresh Python processes and compared.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script in a fresh process (see test_the_same_bytes_in_fresh_processes)
    sys.path.insert(0, str(ROOT))

from util.errors import UserError  # noqa: E402
from util.volume.io import VolumeError  # noqa: E402
from util.volume.preprocess import (PreprocessConfig, load_roi, load_volume, load_volume_and_mask,  # noqa: E402
                                    preprocess_image, preprocess_mask, preprocess_roi)
from util.volume.roi import extract_roi  # noqa: E402

SPACING = (0.8, 0.9, 2.5)  # x, y, z mm
ISSUE_SHAPE = (2, 103, 106)  # D, H, W: the volume of issue 29


def _array(shape, seed: int) -> np.ndarray:
    """CT-like int16 HU values, a different pattern per shape."""
    return np.random.default_rng(seed).normal(-200, 400, size=shape).clip(-1024, 2000).astype(np.int16)


def _image(shape, seed: int) -> sitk.Image:
    img = sitk.GetImageFromArray(_array(shape, seed))
    img.SetSpacing(SPACING)
    img.SetOrigin((-10.0, 20.0, 35.0))
    return img


def write_files(folder: Path) -> dict[str, Path]:
    """The volumes read from disk: 1, 2 and 3 slices along each axis, the issue's volume, a 2-slice label map and
    a RAS copy of a 2-slice volume."""
    files = {}
    for axis, n in itertools.product(range(3), (1, 2, 3)):
        shape = [9, 11, 10]
        shape[axis] = n
        files[f"axis{axis}_n{n}"] = folder / f"axis{axis}_n{n}.nii.gz"
        sitk.WriteImage(_image(shape, 10 * axis + n), str(files[f"axis{axis}_n{n}"]))
    files["issue"] = folder / "issue.nii.gz"  # 106 x 103 x 2 (x, y, z)
    sitk.WriteImage(_image(ISSUE_SHAPE, 29), str(files["issue"]))
    labels = sitk.GetImageFromArray((_array(ISSUE_SHAPE, 30) > 0).astype(np.uint8))
    labels.CopyInformation(sitk.ReadImage(str(files["issue"])))
    files["issue_mask"] = folder / "issue_mask.nii.gz"
    sitk.WriteImage(labels, str(files["issue_mask"]))
    files["ras_2"] = folder / "ras_2.nii.gz"
    sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(files["axis0_n2"])), "RAS"), str(files["ras_2"]))
    return files


CONFIGS = {  # name: PreprocessConfig arguments (sizes D, H, W)
    "size_up": dict(size=(5, 6, 7)),
    "size_down": dict(size=(1, 2, 3)),
    "size_32": dict(size=(32, 32, 32)),
    "spacing_fine_pad": dict(size=(4, 4, 4), spacing=(0.7, 0.6, 0.5)),
    "spacing_coarse": dict(size=None, spacing=(3.0, 2.0, 2.0)),
    "native": dict(size=None),
}
INTERPOLATORS = ("bspline", "linear", "nearest")


def _digest(fn) -> str:
    """sha1 of the array's dtype, shape and bytes (with '+nonfinite' if any value is NaN or infinite), or of the
    refusal's sentence."""
    try:
        arr = np.ascontiguousarray(fn())
    except UserError as e:
        return "refused:" + hashlib.sha1(str(e).encode()).hexdigest()[:16]
    h = hashlib.sha1(f"{arr.dtype}{arr.shape}".encode() + arr.tobytes()).hexdigest()[:16]
    return h if np.isfinite(arr).all() else h + "+nonfinite"


def digests(folder: Path) -> dict[str, str]:
    """Every case's digest; the files of `write_files(folder)` must exist."""
    files, out = {p.name[:-len(".nii.gz")]: str(p) for p in folder.glob("*.nii.gz")}, {}
    for name, path in sorted(files.items()):
        if name == "issue_mask":
            continue
        for (cname, kw), interp in itertools.product(CONFIGS.items(), INTERPOLATORS):
            if name != "issue" and cname == "size_32":
                continue
            cfg = PreprocessConfig(**kw, interpolator=interp)
            out[f"file/{name}/{cname}/{interp}"] = _digest(lambda: load_volume(path, cfg))
    for interp in INTERPOLATORS + ("lanczos", "label_gaussian"):
        cfg = PreprocessConfig(size=(32, 32, 32), interpolator=interp, mask_interpolator=interp)
        out[f"mask/issue/{interp}"] = _digest(lambda: load_volume_and_mask(files["issue"], files["issue_mask"],
                                                                           cfg)[1])
    for shape in itertools.product((1, 2, 3, 4), repeat=3):  # every small shape, in memory (files refuse 1 voxel)
        img = _image(shape, sum(shape))
        for (cname, kw), interp in itertools.product(list(CONFIGS.items())[:2] + [("spacing_fine_pad",
                                                                                     CONFIGS["spacing_fine_pad"])],
                                                     INTERPOLATORS):
            cfg = PreprocessConfig(**kw, interpolator=interp)
            for backend in ("auto", "sitk") if interp == "bspline" else ("auto",):
                out[f"memory/{shape}/{cname}/{interp}/{backend}"] = _digest(
                    lambda: preprocess_image(img, cfg, backend=backend)[0])
    out.update(_roi_digests(files))
    return out


def _roi_digests(files: dict[str, str]) -> dict[str, str]:
    """Lesion boxes on thin volumes: centred, and across the scan's edge (outside parts are air)."""
    out = {}
    for name in ("issue", "axis0_n2", "axis0_n3", "axis1_n2", "axis2_n2", "ras_2"):
        img = sitk.ReadImage(files[name])
        centre = np.array(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()]))
        edge = np.array(img.TransformContinuousIndexToPhysicalPoint([0.2, 0.3, 0.1]))
        for (where, point), interp in itertools.product((("centre", centre), ("edge", edge)), INTERPOLATORS):
            for backend in ("auto", "sitk"):
                out[f"roi/{name}/{where}/{interp}/{backend}"] = _digest(
                    lambda: extract_roi(img, point, (12.0, 14.0, 16.0), (6, 7, 5), "LPS", interp, -1200.0, name,
                                        backend))
            cfg = PreprocessConfig(size=(6, 7, 5), roi_mm=(12.0, 14.0, 16.0), interpolator=interp)
            out[f"roi_load/{name}/{where}/{interp}"] = _digest(lambda: load_roi(files[name], tuple(point), cfg))
    return out


# ---- tests -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The files and the digests of a first load of every case in this process."""
    folder = tmp_path_factory.mktemp("shapes")
    write_files(folder)
    return folder, digests(folder)


def test_every_odd_shape_gives_finite_values_or_one_refusal(loaded):
    first = loaded[1]
    assert len(first) > 1000
    bad = sorted(k for k, v in first.items() if v.endswith("+nonfinite"))
    assert bad == [], f"non-finite values: {bad[:10]}"
    refused = sorted(k for k, v in first.items() if v.startswith("refused:"))
    assert len(refused) == 3 * 5 * 3 and all("_n1/" in k for k in refused)  # only the 1-slice files, at read


def test_every_odd_shape_gives_the_same_bytes_on_a_second_load(loaded):
    folder, first = loaded
    again = digests(folder)
    changed = sorted(k for k in first if again[k] != first[k])
    assert changed == [], f"{len(changed)} cases changed between loads: {changed[:10]}"


def test_the_same_bytes_in_fresh_processes(loaded):
    folder, here = loaded
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.Popen([sys.executable, __file__, str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env) for _ in range(2)]  # two at once: different heaps, half the wait
    for k, proc in enumerate(runs):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        there = json.loads(out)
        changed = sorted(key for key in here if there.get(key) != here[key])
        assert there.keys() == here.keys() and changed == [], f"fresh process {k}: {changed[:10]}"


def test_two_cache_fills_store_the_same_entry(loaded, tmp_path):
    """main_cache stored a different entry for the issue's volume on every fill."""
    from util.volume.cache import VolumeCache
    from util.volume.preprocess import load_cached

    path, cfg = str(loaded[0] / "issue.nii.gz"), PreprocessConfig(size=(32, 32, 32))
    fills = [load_cached(path, cfg, VolumeCache(tmp_path / f"c{k}"))[0] for k in range(2)]
    hits = [load_cached(path, cfg, VolumeCache(tmp_path / f"c{k}"))[0] for k in range(2)]
    assert np.array_equal(fills[0], fills[1]) and np.array_equal(hits[0], hits[1])
    assert np.isfinite(hits[0]).all() and np.abs(hits[0] - fills[0]).max() < 1e-5  # the stored form's rounding


def test_the_issue_volume_through_both_backends_agrees_and_the_2_slice_axis_is_interpolated(tmp_path):
    """106 x 103 x 2 to 32^3: the separable path and the guarded SimpleITK path give the same finite volume, and
    the 32 output slices vary smoothly between the two input slices (the N = 2 mirror spline), never air."""
    img = _image(ISSUE_SHAPE, 29)
    cfg = PreprocessConfig(size=(32, 32, 32))
    ours, ref = preprocess_image(img, cfg)
    theirs, _ = preprocess_image(img, cfg, backend="sitk")
    assert np.isfinite(ours).all() and np.abs(ours - theirs).max() * 2000 < 2e-3  # HU, as tests/test_resample.py
    hu = _array(ISSUE_SHAPE, 29).astype(np.float64)
    means = ours.mean(axis=(1, 2)) * 2000 - 1200
    lo, hi = sorted(hu.mean(axis=(1, 2)))
    assert np.all(means > lo - 60) and np.all(means < hi + 60)
    for point in (img.TransformContinuousIndexToPhysicalPoint([50.0, 50.0, 0.5]),  # a box across both slices
                  img.TransformContinuousIndexToPhysicalPoint([1.0, 100.0, 1.2])):  # and across two faces
        boxes = [extract_roi(img, point, (20.0, 20.0, 20.0), (8, 8, 8), backend=b) for b in ("auto", "sitk")]
        assert np.isfinite(boxes[0]).all() and np.abs(boxes[0] - boxes[1]).max() < 2e-3
        assert (boxes[0] == -1200.0).any() and (boxes[0] > -1024).any()  # air beyond the slab, the scan inside


def test_a_label_map_of_two_slices_resamples_the_same_through_every_interpolator(tmp_path):
    files = write_files(tmp_path)
    img, ref = preprocess_image(sitk.ReadImage(str(files["issue"])), PreprocessConfig(size=(32, 32, 32)))
    mask = sitk.ReadImage(str(files["issue_mask"]))
    for interp in ("nearest", "bspline", "linear"):
        a = preprocess_mask(mask, ref, "m", interp)
        b = preprocess_mask(mask, ref, "m", interp)
        assert np.array_equal(a, b) and set(np.unique(a)) <= {0, 1}


def test_a_non_finite_preprocessing_result_is_refused_naming_the_file(tmp_path, monkeypatch):
    """Whatever goes wrong inside, NaN or Inf never leaves preprocessing (the last check of every array)."""
    import util.volume.preprocess as pp

    files = write_files(tmp_path)

    def broken(*args, **kwargs):
        arr = np.zeros((5, 6, 7), np.float32)
        arr[1, 2, 3] = np.nan
        return arr, sitk.Image([7, 6, 5], sitk.sitkUInt8)

    monkeypatch.setattr(pp, "resample_centered_array", broken)
    path = str(files["axis0_n3"])
    try:
        load_volume(path, PreprocessConfig(size=(5, 6, 7)))
        raise AssertionError("a NaN volume was returned")
    except VolumeError as e:
        msg = str(e)
    assert msg.startswith(f"{path}: preprocessing produced 1 NaN or infinite values of 210") and "\n" not in msg
    monkeypatch.setattr(pp, "extract_roi", lambda *a, **k: np.full((5, 7, 6), np.inf, np.float32))
    img = sitk.ReadImage(path)
    centre = img.TransformContinuousIndexToPhysicalPoint([4.0, 4.0, 1.0])
    try:
        preprocess_roi(img, centre, PreprocessConfig(size=(5, 7, 6), roi_mm=(10.0, 10.0, 10.0)), name=path)
        raise AssertionError("an infinite box was returned")
    except VolumeError as e:
        assert str(e).startswith(f"{path}: preprocessing produced 210 NaN")


if __name__ == "__main__":  # python tests/test_volume_shapes.py FOLDER: the digests as JSON (a fresh process)
    import torch

    torch.set_num_threads(1)
    print(json.dumps(digests(Path(sys.argv[1]))))
