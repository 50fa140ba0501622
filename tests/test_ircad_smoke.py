"""bench/ircad_liver.py --quick: the IRCAD liver segmentation benchmark runs end to end on the real CT."""
from __future__ import annotations

import json
import math

import pytest
import SimpleITK as sitk

from tests.helpers import run_script


def test_quick_ircad_liver_trains_on_one_part_and_scores_the_other(shared_data, tmp_path):
    work = tmp_path / "ircad"
    r = run_script("bench/ircad_liver.py", "--quick", "--data_dir", shared_data, "--work_dir", "ircad",
                   cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}, timeout=180)  # a relative --work_dir
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = r.stdout
    assert "$ python main_finetune.py --task segmentation" in out and "--finetune none" in out
    assert "$ python main_finetune.py --eval" in out and "$ python main_predict.py" in out
    assert "held-out Dice" in out and "fit Dice" in out
    summary = json.loads((work / "summary.json").read_text())
    (fold,) = summary["folds"]
    assert (fold["train_part"], fold["heldout_part"], fold["epochs"]) == ("even", "odd", 2)
    for key in ("heldout_dice_last", "heldout_dice_best", "fit_dice_last", "heldout_dice_native_last"):
        assert math.isfinite(fold[key]) and 0.0 <= fold[key] <= 1.0, key  # the liver is in both parts: defined

    # slabs alternate between the parts, 4 slices apart, both parts hold liver, the CT's geometry is kept
    parts = summary["parts"]
    slabs = sorted((s["slices"], name, s) for name, p in parts.items() for s in p["slabs"])
    assert [name for _, name, _ in slabs] == ["even", "odd"] * 3
    assert all(b[0][0] - a[0][1] - 1 == 4 for a, b in zip(slabs, slabs[1:]))
    assert slabs[0][0][0] == 0 and slabs[-1][0][1] == 128
    assert all(p["liver_voxels"] > 500_000 for p in parts.values())
    ct = sitk.ReadImage(str(shared_data / "ircadb01" / "ct.nii.gz"))
    for (lo, hi), name, s in slabs:
        img, mask = sitk.ReadImage(s["image"]), sitk.ReadImage(s["mask"])
        assert img.GetSize() == mask.GetSize() == (512, 512, hi - lo + 1), name
        assert img.GetSpacing() == ct.GetSpacing() and img.GetDirection() == ct.GetDirection()
        origin = ct.TransformIndexToPhysicalPoint((0, 0, lo))  # NIfTI stores it as float32
        assert img.GetOrigin() == pytest.approx(origin, abs=1e-4) and mask.GetOrigin() == img.GetOrigin()
        assert set(sitk.GetArrayViewFromImage(mask).ravel()[::97].tolist()) <= {0, 1}
