"""Procedural chest-CT demo data: realistic HU, files, CSVs, determinism, idempotence, speed."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from util.data.path_table import read_path_table
from util.volume.preprocess import PreprocessConfig, load_volume_and_mask
from util.data.demo import make_demo_data, make_phantom


def test_phantom_has_realistic_hu_per_tissue():
    hu, mask, sp = make_phantom(np.random.default_rng(5), effusion=True)
    d, h, w = hu.shape
    assert hu.dtype == np.int16 and 40 <= d <= 64 and 80 <= w <= 112 and 64 <= h <= w
    assert 320 <= w * sp[2] <= 400 and 220 <= d * sp[0] <= 300
    assert abs(np.median(hu[:, :3, :3]) + 1000) <= 5                       # air in the corners
    lung = hu[d // 2, int(h * 0.45), int(w * 0.2):int(w * 0.3)]             # right lung, mid slice
    assert -920 < np.median(lung) < -780 and lung.std() > 10
    centre = hu[:, h // 2 - 2:h // 2 + 2, w // 2 - 2:w // 2 + 2]            # mediastinum: soft tissue
    assert 0 < np.median(centre) < 80
    assert (hu > 500).mean() > 0.003 and 600 < np.median(hu[hu > 500]) < 800  # bone
    assert mask.dtype == np.uint8 and mask.sum() > 0 and 0 < np.median(hu[mask > 0]) < 60  # fluid ~15 HU
    vessels = (hu > -200) & (hu < 200)
    assert vessels[:, int(h * 0.3):int(h * 0.6), int(w * 0.15):int(w * 0.35)].sum() > 0


def test_demo_data_files_csvs_and_orientation(tmp_path):
    paths = make_demo_data(str(tmp_path / "demo"), n_pretrain=3, n_labeled=8, seed=4)
    assert set(paths) >= {"root", "pretrain", "train", "val", "predict", "manifest"}
    cols = {k: list(pd.read_csv(paths[k]).columns) for k in ("pretrain", "train", "val", "predict")}
    assert cols == {"pretrain": ["Path"], "train": ["Path", "Label", "Mask"], "val": ["Path", "Label", "Mask"],
                    "predict": ["Path", "Label"]}
    train = read_path_table(paths["train"], ("Path", "Label", "Mask"))
    assert len(train) == 4 and len(pd.read_csv(paths["val"])) == 2 and len(pd.read_csv(paths["predict"])) == 2
    labelled = pd.concat([read_path_table(paths[k], ("Path", "Mask")) for k in ("train", "val")])
    orients = set()
    for img_path, label, mask_path in labelled[["Path", "Label", "Mask"]].itertuples(index=False):
        img, msk = sitk.ReadImage(img_path), sitk.ReadImage(mask_path)
        assert img.GetPixelID() == sitk.sitkInt16 and msk.GetPixelID() == sitk.sitkUInt8
        orients.add(sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection()))
        assert (sitk.GetArrayViewFromImage(msk).max() > 0) == bool(label)
        if label:  # mask (stored LPS) lands on the effusion even when the image is stored RAS
            arr, m = load_volume_and_mask(img_path, mask_path, PreprocessConfig(size=None))
            assert 0.55 < np.median(arr[m > 0]) < 0.65  # 0 to 60 HU in the [-1200, 800] window
    assert orients == {"LPS", "RAS"} and sum(pd.read_csv(paths["train"])["Label"]) == 2


def test_demo_data_is_deterministic_and_idempotent(tmp_path):
    a = make_demo_data(str(tmp_path / "a"), n_pretrain=2, n_labeled=4, seed=7)
    b = make_demo_data(str(tmp_path / "b"), n_pretrain=2, n_labeled=4, seed=7)
    for k in ("pretrain", "train"):
        for pa, pb in zip(read_path_table(a[k])["Path"], read_path_table(b[k])["Path"]):
            arr = [sitk.GetArrayFromImage(sitk.ReadImage(p)) for p in (pa, pb)]
            assert np.array_equal(*arr)
    first = read_path_table(a["train"])["Path"].iloc[0]
    stamp = os.stat(first).st_mtime_ns
    assert make_demo_data(str(tmp_path / "a"), n_pretrain=2, n_labeled=4, seed=7) == a
    assert os.stat(first).st_mtime_ns == stamp
    assert json.loads(Path(a["manifest"]).read_text())["seed"] == 7
    make_demo_data(str(tmp_path / "a"), n_pretrain=2, n_labeled=4, seed=8)  # new parameters: regenerated
    assert os.stat(first).st_mtime_ns != stamp and json.loads(Path(a["manifest"]).read_text())["seed"] == 8


def test_default_demo_data_takes_under_ten_cpu_seconds(tmp_path):
    t = time.process_time()  # CPU time: robust to other jobs sharing the machine
    paths = make_demo_data(str(tmp_path / "demo"))
    assert time.process_time() - t < 10
    assert len(pd.read_csv(paths["pretrain"])) == 24 and len(pd.read_csv(paths["train"])) == 16
