"""bench/lidc_transfer.py --quick: the real-data transfer benchmark runs end to end on a small LIDC subset."""
from __future__ import annotations

import json

import sys

import numpy as np
import pandas as pd

from tests.helpers import ROOT, run_script


def test_quick_lidc_transfer_runs_all_arms_and_splits_by_exam(shared_data, tmp_path):
    work = tmp_path / "lidc"
    r = run_script("bench/lidc_transfer.py", "--quick", "--data_dir", shared_data / "lidc_nodules",
                   "--work_dir", work, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    for arm in ("pretrained", "linprobe", "scratch", "size_only", "voxels_only"):
        assert 0.0 <= summary["mean"][arm] <= 1.0, arm
        assert summary["runs"][0][arm] == summary["mean"][arm]
    assert "$ python main_pretrain.py" in r.stdout and "--finetune none" in r.stdout and "test AUROC" in r.stdout
    pairs = {f"{a} - {b}" for a in ("pretrained", "linprobe") for b in ("scratch", "size_only")}
    assert set(summary["differences"]) == pairs
    assert (work / "scratch_seed0" / "test_predictions.csv").is_file()
    table = pd.read_csv(shared_data / "lidc_nodules" / "nodules.csv")
    exam = dict(zip(table["index"].map(lambda i: f"nodule_{i:04d}.nii.gz"), table["exam_id"]))
    exams = {split: {exam[p.split("/")[-1]] for p in pd.read_csv(work / f"{split}.csv")["Path"]}
             for split in ("pretrain", "test")}
    assert exams["pretrain"] and exams["test"] and not exams["pretrain"] & exams["test"]


def test_labelled_subsets_come_from_training_exams_and_differ_by_seed():
    sys.path.insert(0, str(ROOT / "bench"))
    from lidc_transfer import draw_labelled, split_by_exam

    table = pd.DataFrame({"exam_id": np.repeat(np.arange(40), 3)})
    train, test = split_by_exam(table, 0.25, seed=0)
    assert test.sum() == 30 and not (train & test).any()
    a, b = draw_labelled(train, 0.25, 0), draw_labelled(train, 0.25, 1)
    assert a.sum() == b.sum() == round(90 * 0.25)
    assert not (a & test).any() and not (b & test).any()
    assert (a != b).any() and np.array_equal(a, draw_labelled(train, 0.25, 0))


def test_paired_bootstrap_interval_of_an_auroc_difference():
    sys.path.insert(0, str(ROOT / "bench"))
    from lidc_transfer import paired_bootstrap
    from sklearn.metrics import roc_auc_score as auroc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    good, tied = y + rng.normal(0, 1, 300), np.round(y + rng.normal(0, 2, 300))
    point, lo, hi = paired_bootstrap(y, [good], [tied], n=300)
    assert abs(point - (auroc(y, good) - auroc(y, tied))) < 1e-12 and 0 < lo < point < hi
    assert paired_bootstrap(y, [good, tied], [good, tied], n=50) == (0.0, 0.0, 0.0)
