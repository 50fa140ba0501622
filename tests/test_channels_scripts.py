"""Channels end to end (issue 32) on a four-sequence brain MRI study made from the MNI template (tests/mri_study.py):
pretraining, finetuning (classification and segmentation), caching and prediction with --channels, a table of 4D
files, lesion boxes of every channel, and the refusals (another order, a missing channel, zscore without
--norm_pix_loss, a C-channel model into C' channels). Tiny models, 32^3 inputs in 8^3 patches."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import load, run_in_process
from tests.mri_study import CHANNELS, make_study, write_4d

CHANNEL_FLAGS = ("--channels", ",".join(CHANNELS), "--norm", "zscore")
TINY = ("--input_size", 32, "--patch_size", 8, "--batch_size", 2, "--num_workers", 0, "--device", "cpu",
        "--warmup_epochs", 0, "--epochs", 1)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("mri")
    out = make_study(root, 8)
    out["mae"] = str(root / "pre" / "mae_pretrained.pth")
    r = run_in_process("main_pretrain.py", "--data_path", out["csv"], "--val_path", out["val"], "--output_dir",
                       root / "pre", "--model", "mae_vit_tiny_patch16", *TINY, "--save_every", 0, "--vis_every", 1,
                       "--norm_pix_loss", "--cache_dir", root / "cache", *CHANNEL_FLAGS)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out["pretrain_stdout"] = r.stdout
    return out


def finetune(study, out, *extra):
    return run_in_process("main_finetune.py", "--train_csv", study["train"], "--val_csv", study["val"],
                          "--output_dir", out, "--model", "vit_tiny_patch16", *TINY, *extra)


def predict(study, ckpt, out_csv, *extra, table=None):
    return run_in_process("main_predict.py", "--input_csv", table or study["val"], "--finetune", ckpt,
                          "--output_csv", out_csv, "--num_workers", 0, "--device", "cpu", *extra)


def test_four_channel_pretraining_stores_its_channels_and_shows_each_in_its_picture(study):
    folder = os.path.dirname(study["mae"])
    ckpt = load(study["mae"])
    assert ckpt["preprocess"]["channels"] == list(CHANNELS) and ckpt["preprocess"]["norm"] == ["zscore"] * 4
    assert ckpt["model"]["patch_embed.proj.weight"].shape[1] == 4
    assert ckpt["model"]["decoder_pred.0.weight"].shape[0] == 8 ** 3 * 4
    from PIL import Image

    one = Image.open(os.path.join(folder, "reconstruction-0001.png"))
    assert one.height > 3.5 * one.width  # four 3x3 grids, one per channel, stacked
    log = [json.loads(x) for x in open(os.path.join(folder, "log.txt"))]
    assert np.isfinite(log[-1]["val_ratio"])


def test_classification_finetunes_from_the_four_channel_mae_and_predicts_with_its_channels(study, tmp_path):
    r = finetune(study, tmp_path / "cls", "--finetune", study["mae"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "its encoder sets --channels t1,t1ce,t2,flair --norm zscore,zscore,zscore,zscore" in r.stdout
    best = tmp_path / "cls" / "checkpoint-best.pth"
    assert load(best)["meta"]["in_chans"] == 4
    r = predict(study, best, tmp_path / "p.csv")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = pd.read_csv(tmp_path / "p.csv")
    assert list(out.columns[:4]) == list(CHANNELS) and out["error"].isna().all() and len(out) == 4
    # the same rows as 4D files, their order said by --channels: the same probabilities
    val = pd.read_csv(study["val"])
    rows = [{"Path": write_4d(study["folder"], row, str(tmp_path / f"r{i}.nii.gz")), "Label": row["Label"]}
            for i, row in val.iterrows()]
    pd.DataFrame(rows).to_csv(tmp_path / "four.csv", index=False)  # absolute paths
    r = predict(study, best, tmp_path / "p4.csv", "--channels", ",".join(CHANNELS), table=tmp_path / "four.csv")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    np.testing.assert_array_equal(pd.read_csv(tmp_path / "p4.csv")["prob_1"], out["prob_1"])


def test_another_channel_order_or_a_missing_channel_is_refused_in_one_sentence(study, tmp_path):
    r = finetune(study, tmp_path / "cls", "--finetune", study["mae"], "--epochs", 1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    best = tmp_path / "cls" / "checkpoint-last.pth"
    r = predict(study, best, tmp_path / "p.csv", "--channels", "t1,t2,t1ce,flair")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("error: --channels t1,t2,t1ce,flair is not what ")
    assert "its channels are t1,t1ce,t2,flair in this order" in lines[-1]
    no_t2 = os.path.join(study["folder"], "no_t2.csv")
    pd.read_csv(study["val"]).drop(columns=["t2"]).to_csv(no_t2, index=False)
    r = predict(study, best, tmp_path / "p.csv", table=no_t2)
    assert r.returncode == 2 and "has no column 't2'; the model reads the channels t1,t1ce,t2,flair" in r.stderr
    assert not (tmp_path / "p.csv").exists()


def test_segmentation_with_four_channels_through_the_cache_predicts_label_maps(study, tmp_path):
    cache = tmp_path / "cache"
    r = run_in_process("main_cache.py", "--csv", study["train"], "--cache_dir", cache, "--input_size", 32,
                       "--workers", 1, *CHANNEL_FLAGS)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = finetune(study, tmp_path / "seg", "--task", "segmentation", "--cache_dir", cache, *CHANNEL_FLAGS)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "4 of 4 training volumes came from the cache" in r.stdout, r.stdout[-2000:]
    r = run_in_process("main_predict.py", "--input_csv", study["val"], "--finetune",
                       tmp_path / "seg" / "checkpoint-last.pth", "--output_csv", tmp_path / "s.csv",
                       "--num_workers", 0, "--device", "cpu")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = pd.read_csv(tmp_path / "s.csv")
    assert out["error"].isna().all() and all(os.path.exists(p) for p in out["seg_path"])


def test_lesion_boxes_of_every_channel_and_embeddings_of_the_mae(study, tmp_path):
    val = pd.read_csv(study["val"])
    val[["coordX", "coordY", "coordZ"]] = [[0.0, -18.0, 10.0]] * len(val)  # MNI mm, near the ventricles
    points, train_points = (os.path.join(study["folder"], f) for f in ("points.csv", "train_points.csv"))
    val.to_csv(points, index=False)  # beside the images: relative paths resolve against the table's folder
    pd.concat([val, val]).to_csv(train_points, index=False)
    r = run_in_process("main_finetune.py", "--train_csv", train_points, "--output_dir",
                       tmp_path / "roi", "--model", "vit_tiny_patch16", *TINY, "--roi_mm", 40, 40, 40,
                       "--finetune", study["mae"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = predict(study, tmp_path / "roi" / "checkpoint-last.pth", tmp_path / "p.csv", "--save_inputs",
                tmp_path / "inputs", table=points)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import SimpleITK as sitk

    dumped = sitk.ReadImage(str(tmp_path / "inputs" / "row0001_s04_t1.nii.gz"))
    assert dumped.GetSize() == (32, 32, 32, 4) and np.allclose(dumped.GetSpacing()[:3], 40 / 32)
    r = run_in_process("main_predict.py", "--input_csv", study["val"], "--finetune", study["mae"], "--embeddings",
                       tmp_path / "e.npy", "--num_workers", 0, "--device", "cpu")
    assert r.returncode == 0 and np.load(tmp_path / "e.npy").shape == (4, 192)


def test_zscore_pretraining_needs_norm_pix_loss_and_a_four_channel_model_is_not_carried_into_two(study, tmp_path):
    r = run_in_process("main_pretrain.py", "--data_path", study["train"], "--output_dir", tmp_path / "x",
                       "--model", "mae_vit_tiny_patch16", *TINY, *CHANNEL_FLAGS)
    assert r.returncode == 2 and "zscore channels (--norm) have values outside [0, 1]" in r.stderr
    r = finetune(study, tmp_path / "two", "--finetune", study["mae"], "--channels", "t1,t2")
    assert r.returncode == 2 and "holds a 4-channel model and this run has 2 channel(s)" in r.stderr, r.stderr[-500:]


def test_a_ct_checkpoint_carried_into_four_channels_by_finetune_says_so(study, tmp_path):
    torch.manual_seed(0)
    import models_mae3d

    ct = tmp_path / "ct.pth"
    torch.save({"model": models_mae3d.mae_vit_tiny_patch16(img_size=32, patch_size=8).state_dict()}, ct)
    r = finetune(study, tmp_path / "carried", "--finetune", ct, *CHANNEL_FLAGS, "--channel_init", "random")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    said = [x for x in r.stdout.splitlines() if "1-channel model" in x]
    assert said == [f"--finetune {ct} is a 1-channel model: its patch embedding kernel is initialised at random for "
                    f"the 4 channels (--channel_init random); every other weight is kept."]


def test_checkpoints_of_the_code_before_channels_load_both_ways(study, tmp_path):
    """Old files (tests/fixtures/checkpoints_before_record.json, rebuilt as tests/test_settings.py does) read as one
    CT channel, and an old 1-channel MAE starts a four-channel MRI run; a CT checkpoint written now stores the
    preprocessing keys the old code wrote (its from_dict refused any other key), with the same values."""
    from tests.test_settings import FIXTURES, _rebuild
    from util.task.record import read_record
    from util.volume.preprocess import PreprocessConfig

    fixtures = json.loads(FIXTURES.read_text())
    old = _rebuild(fixtures["mae_pretrained"], study["folder"], f"{tmp_path}/")
    torch.save(old, tmp_path / "old_mae.pth")
    rec = read_record(tmp_path / "old_mae.pth")
    assert rec.preprocess.plain and rec.preprocess.in_chans == 1
    assert PreprocessConfig(size=(32, 32, 32)).to_dict() == fixtures["mae_pretrained"]["preprocess"]
    r = run_in_process("main_pretrain.py", "--data_path", study["train"], "--output_dir", tmp_path / "from_old",
                       "--model", "mae_vit_tiny_patch16", "--input_size", 32, "--patch_size", 16, "--batch_size", 2,
                       "--num_workers", 0, "--device", "cpu", "--epochs", 1, "--warmup_epochs", 0, "--save_every", 0,
                       "--vis_every", 0, "--channels", ",".join(CHANNELS), "--norm", "percentile", "--init",
                       tmp_path / "old_mae.pth")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "is a 1-channel model: its patch embedding kernel is replicated into each of the 4 channels" in r.stdout
