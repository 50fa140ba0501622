"""Lesion-level rows (--roi_mm) through the scripts, on the real IRCAD CT: finetuning on organ points, prediction
(probabilities, embeddings, LPS/RAS copies, a point outside the scan, one read per scan) and main_cache."""
import csv
import json
import os
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

import util.volume.preprocess as preprocess
from datasets_three_d_fine import Custom3DDataset
from tests.helpers import run_in_process
from util.errors import UserError
from util.volume.preprocess import PreprocessConfig

GROUPS = {"liver": ["liver"], "lung": ["leftlung", "rightlung"], "bone": ["bone"], "kidney": ["leftkidney", "rightkidney"]}
ROI = ["--roi_mm", 64, 64, 64, "--input_size", 32]
COLS = ["Path", "coordX", "coordY", "coordZ", "Label"]


def organ_points(d, per_group=18, seed=0):
    """Random voxels inside each organ group's masks, as world (LPS) points: {label: [(x, y, z), ...]}."""
    rng, out = np.random.default_rng(seed), {}
    for label, files in enumerate(GROUPS.values()):
        pts = []
        for f in files:
            m = sitk.ReadImage(str(d / f"mask_{f}.nii.gz"))
            z, y, x = np.nonzero(sitk.GetArrayViewFromImage(m))
            for k in rng.choice(len(z), per_group // len(files), replace=False):
                pts.append(m.TransformIndexToPhysicalPoint([int(x[k]), int(y[k]), int(z[k])]))
        out[label] = [pts[i] for i in rng.permutation(len(pts))]
    return out


def write_table(path, rows, cols=COLS):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def organs(shared_data, tmp_path_factory):
    """A linear probe of a (random) tiny ViT finetuned on 64 mm boxes around 12 points per organ group, scored on
    6 held-out points per group; the crops are cached on the way (--cache_dir)."""
    d, tmp = shared_data / "ircadb01", tmp_path_factory.mktemp("roi")
    ct = str(d / "ct.nii.gz")
    pts = organ_points(d)
    rows = {s: [[ct, *(f"{v:.2f}" for v in p), label] for label, ps in pts.items() for p in part(ps)]
            for s, part in (("train", lambda p: p[:12]), ("val", lambda p: p[12:]))}
    train, val = (write_table(tmp / f"{s}.csv", rows[s]) for s in ("train", "val"))
    out, cache = tmp / "ft", tmp / "cache"
    r = run_in_process("main_finetune.py", "--train_csv", train, "--val_csv", val, "--output_dir", out, *ROI,
                       "--model", "vit_tiny_patch16", "--patch_size", 8, "--epochs", 12, "--warmup_epochs", 1,
                       "--batch_size", 16, "--num_workers", 0, "--device", "cpu", "--linprobe", "--blr", 3,
                       "--print_freq", 100, "--finetune", "none", "--cache_dir", cache)
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(tmp=tmp, ct=ct, train=train, val=val, out=out, cache=cache, rows=rows, d=d)


def test_a_probe_on_organ_centred_boxes_tells_organs_apart_and_the_checkpoint_keeps_the_roi(organs):
    log = [json.loads(line) for line in (organs["out"] / "log.txt").read_text().splitlines()]
    best = max(float(e["val_auroc"]) for e in log)
    assert best > 0.75, best  # chance: 0.5 (4 organ groups, 6 held-out points each)
    assert max(float(e["val_accuracy"]) for e in log) > 0.4  # chance: 0.25
    ckpt = torch.load(organs["out"] / "checkpoint-best.pth", map_location="cpu", weights_only=True)
    assert ckpt["preprocess"]["roi_mm"] == [64.0, 64.0, 64.0] and ckpt["preprocess"]["roi_coords"] == "LPS"
    assert ckpt["preprocess"]["size"] == [32, 32, 32]


def test_predict_crops_as_training_lps_and_ras_copies_agree_and_a_point_outside_is_its_rows_error(organs,
                                                                                                monkeypatch):
    tmp, ct = organs["tmp"], organs["ct"]
    ras = str(tmp / "ct_ras.nii.gz")
    sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(ct), "RAS"), ras)
    val = organs["rows"]["val"]
    rows = val + [[ras, *val[0][1:]], [ct, "-500", "0", "0", 0], [ct, "1", "x", "1", 0]]
    table = write_table(tmp / "predict.csv", rows)
    reads = []
    real = preprocess.read_image
    monkeypatch.setattr(preprocess, "read_image", lambda p: reads.append(p) or real(p))
    monkeypatch.setattr(preprocess, "_SCANS", OrderedDict())  # forget the scans the training run read
    out, emb = tmp / "pred.csv", tmp / "emb.npy"
    r = run_in_process("main_predict.py", "--input_csv", table, "--output_csv", out, "--embeddings", emb,
                       "--finetune", organs["out"] / "checkpoint-best.pth", "--device", "cpu", "--num_workers", 0,
                       "--batch_size", 8)
    assert r.returncode == 2, r.stderr[-2000:]  # two rows failed, the others were predicted
    assert sorted(reads) == sorted([ct, ras])  # 27 rows on two scans: each scan read once
    df = pd.read_csv(out, keep_default_na=False)
    n = len(val)
    assert (df["error"][:n + 1] == "").all()
    assert "row" not in df["error"][n] and "(-500.0, 0.0, 0.0) mm (LPS) is outside the scan" in df["error"][n + 1]
    assert "not a finite point" in df["error"][n + 2]
    probs = df[[c for c in df.columns if c.startswith("prob_")]][:n + 1].to_numpy(float)
    np.testing.assert_allclose(probs[n], probs[0], atol=1e-4)  # the same point on the RAS copy
    acc = (df["pred"][:n].astype(int) == df["Label"][:n].astype(int)).mean()
    assert acc > 0.4, acc  # as the validation during training (chance 0.25): prediction crops as training did
    e = np.load(emb)
    np.testing.assert_allclose(e[n], e[0], atol=1e-4)
    assert not np.allclose(e[0], e[1], atol=1e-3)  # another point, another box


def test_main_cache_caches_one_box_per_point_and_training_reads_them(organs):
    cache = organs["tmp"] / "cache2"
    r = run_in_process("main_cache.py", "--csv", organs["val"], "--cache_dir", cache, *ROI, "--workers", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "24 done (newly cached), 0 already cached, 0 failed" in r.stdout
    entries = [f for _, _, fs in os.walk(cache) for f in fs if f.endswith(".vol")]  # util.volume.cache entries
    assert len(entries) == 24  # one scan, 24 points: 24 boxes (one lesion's crop is never another's)
    cfg = PreprocessConfig(size=(32, 32, 32), roi_mm=(64, 64, 64))
    ds = Custom3DDataset(str(organs["val"]), 32, train=False, preprocess=cfg, cache_dir=str(cache))
    fresh = Custom3DDataset(str(organs["val"]), 32, train=False, preprocess=cfg)
    for i in (0, 7, 23):
        np.testing.assert_allclose(ds[i][0].numpy(), fresh[i][0].numpy(), atol=0.51 / 2000)  # cache: whole HU
    assert ds.cache.hits == 3 and ds.cache.misses == 0
    r = run_in_process("main_cache.py", "--csv", organs["val"], "--cache_dir", cache, *ROI, "--workers", 1)
    assert "0 done (newly cached), 24 already cached" in r.stdout


def test_mask_rows_centre_the_box_on_the_label_centroid(organs):
    d, tmp = organs["d"], organs["tmp"]
    spleen = str(d / "mask_spleen.nii.gz")
    centre = preprocess.label_centroid(sitk.ReadImage(spleen), 1)
    masks = write_table(tmp / "masks.csv", [[organs["ct"], spleen, 1]], ["Path", "Mask", "Label"])
    points = write_table(tmp / "points.csv", [[organs["ct"], *centre, 1]])
    by_mask = Custom3DDataset(str(masks), 32, False, PreprocessConfig(size=32, roi_mm=(64, 64, 64), roi_label=1))
    by_point = Custom3DDataset(str(points), 32, False, PreprocessConfig(size=32, roi_mm=(64, 64, 64)))
    a, b = by_mask[0][0].numpy(), by_point[0][0].numpy()
    np.testing.assert_array_equal(a, b)
    assert 0.5 < float(np.median(a)) < 0.7  # soft tissue (spleen ~ 40 HU -> 0.62 in [-1200, 800]), not air
    ras = PreprocessConfig(size=32, roi_mm=(64, 64, 64), roi_coords="RAS")
    flipped = write_table(tmp / "ras.csv", [[organs["ct"], -centre[0], -centre[1], centre[2], 1]])
    np.testing.assert_array_equal(Custom3DDataset(str(flipped), 32, False, ras)[0][0].numpy(), b)


def test_a_point_outside_the_scan_stops_training_naming_the_row_and_the_point(organs):
    bad = write_table(organs["tmp"] / "bad.csv", organs["rows"]["train"][:3] + [[organs["ct"], "900", "0", "0", 1]])
    ds = Custom3DDataset(str(bad), 32, True, PreprocessConfig(size=32, roi_mm=(64, 64, 64)))
    with pytest.raises(UserError, match=r"bad\.csv: row 4 \(line 5\): .*ct\.nii\.gz: the ROI centre \(x, y, z\) = "
                                        r"\(900\.0, 0\.0, 0\.0\) mm \(LPS\) is outside the scan"):
        ds[3]


def test_roi_settings_change_the_cache_key_only_when_on_and_bad_combinations_are_refused(tmp_path):
    plain = PreprocessConfig(size=32)
    assert plain.key() == PreprocessConfig.from_dict({k: v for k, v in plain.to_dict().items()
                                                      if not k.startswith("roi")}).key()
    boxes = [PreprocessConfig(size=32, roi_mm=m, roi_coords=c) for m, c in [((64,) * 3, "LPS"), ((50,) * 3, "LPS"),
                                                                             ((64,) * 3, "RAS")]]
    assert len({plain.key(), *(b.key() for b in boxes)}) == 4
    with pytest.raises(UserError, match="--roi_label needs --roi_mm"):
        PreprocessConfig(roi_label=1)
    with pytest.raises(UserError, match="cannot be combined with --spacing"):
        PreprocessConfig(size=32, spacing=(1, 1, 1), roi_mm=(50, 50, 50))
    table = write_table(tmp_path / "t.csv", [["a.nii.gz", 1, 2, 3, 0]], ["Path", "x", "y", "z", "Label"])
    (tmp_path / "a.nii.gz").write_bytes(b"")
    with pytest.raises(UserError, match=r"t\.csv: has no 'coordX' column .*--roi_label"):
        Custom3DDataset(str(table), 32, False, PreprocessConfig(size=32, roi_mm=(50, 50, 50)))
    r = run_in_process("main_finetune.py", "--task", "segmentation", "--roi_mm", 50, 50, 50, "--train_csv", table)
    assert r.returncode == 2 and "cannot be combined with --task segmentation" in r.stderr


@pytest.mark.parametrize("task", ["regression", "multilabel"])
def test_regression_and_multilabel_rows_train_and_predict_on_boxes(organs, task):
    """The same organ points as regression rows (target: the organ group's index) and as multi-label rows (liver?
    lung?): the run trains on the boxes (cached by the fixture), the checkpoint keeps the task and the ROI, and
    prediction gives one finite, non-constant value per point."""
    tmp = organs["tmp"]
    extra = ["target"] if task == "regression" else ["is_liver", "is_lung"]

    def table(split):
        rows = [r[:4] + ([float(r[4])] if task == "regression" else [int(r[4] == 0), int(r[4] == 1)])
                for r in organs["rows"][split]]
        return write_table(tmp / f"{task}_{split}.csv", rows, COLS[:4] + extra)

    train, val, out = table("train"), table("val"), tmp / f"ft_{task}"
    r = run_in_process("main_finetune.py", "--train_csv", train, "--val_csv", val, "--output_dir", out, *ROI,
                       "--label_columns", *extra, *(["--regression"] if task == "regression" else []),
                       "--model", "vit_tiny_patch16", "--patch_size", 8, "--epochs", 3, "--warmup_epochs", 1,
                       "--batch_size", 16, "--num_workers", 0, "--device", "cpu", "--linprobe", "--blr", 3,
                       "--finetune", "none", "--cache_dir", organs["cache"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "came from the cache" in r.stdout
    ckpt = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ckpt["preprocess"]["roi_mm"] == [64.0, 64.0, 64.0]
    r = run_in_process("main_predict.py", "--input_csv", val, "--output_csv", tmp / f"{task}_pred.csv",
                       "--finetune", out / "checkpoint-last.pth", "--num_workers", 0, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_csv(tmp / f"{task}_pred.csv")
    cols = [f"pred_{c}" for c in extra] if task == "regression" else [f"prob_{c}" for c in extra]
    values = df[cols].to_numpy(float)
    assert len(df) == len(organs["rows"]["val"]) and df["error"].isna().all()
    assert np.isfinite(values).all() and values.std(axis=0).min() > 1e-4
