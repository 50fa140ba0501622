"""The built-in demo learns (issue 13): the demo MAE reconstructs held-out masked patches far better than the
trivial reconstruction, and the linear probe of its encoder tells phantoms with a pleural effusion from those
without on volumes it never saw. Shortened runs of the demo presets (the README states what the full demo reaches)."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from tests.helpers import run_in_process

PRETRAIN_EPOCHS = 12   # of the preset's 25 (at 10 the ratio is still 0.67): 0.57 here, 0.46 at the end
PROBE_EPOCHS = 20      # of the preset's 30


def log_lines(folder) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(folder, "log.txt"))]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A folder where main_pretrain.py (demo preset, shortened) has run: demo_data/ and output_dir/."""
    root = tmp_path_factory.mktemp("demo_learning")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        r = run_in_process("main_pretrain.py", "--epochs", PRETRAIN_EPOCHS, "--vis_every", PRETRAIN_EPOCHS)
    finally:
        os.chdir(cwd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return root


def run_demo(root, script: str, *args):
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return run_in_process(script, *args)
    finally:
        os.chdir(cwd)


def test_demo_mae_halves_the_trivial_reconstruction_error_on_held_out_volumes(demo_dir):
    lines = log_lines(demo_dir / "output_dir" / "demo_pretrain")
    scored = [x for x in lines if "val_ratio" in x]
    assert [x["epoch"] for x in scored] == [PRETRAIN_EPOCHS]
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]          # the training loss falls
    print("held-out ratio", scored[-1]["val_ratio"])
    assert scored[-1]["val_ratio"] < 0.62, scored[-1]           # the trivial reconstruction: 1.0
    assert (demo_dir / "output_dir" / "demo_pretrain" / f"reconstruction-{PRETRAIN_EPOCHS:04d}.png").exists()


def test_linear_probe_of_the_demo_encoder_finds_the_effusions_on_unseen_volumes(demo_dir):
    r = run_demo(demo_dir, "main_finetune.py", "--epochs", PROBE_EPOCHS)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "demo preset" in r.stdout and "linprobe=True" in r.stdout
    lines = log_lines(demo_dir / "output_dir" / "demo_finetune")
    print("probe", [(x["val_auroc"], x["val_accuracy"], round(x["train_loss"], 3)) for x in lines])
    assert max(x["val_auroc"] for x in lines) >= 0.9, [x["val_auroc"] for x in lines]
    assert lines[-1]["val_accuracy"] >= 0.75 and lines[-1]["train_loss"] < 0.3 < lines[0]["train_loss"]
    # main_predict.py's demo: the best checkpoint on demo_data/predict.csv (volumes neither split saw)
    r = run_demo(demo_dir, "main_predict.py", "--num_workers", "0")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = pd.read_csv(demo_dir / "output_dir" / "demo_predict" / "predictions.csv")
    prob = out["prob_1"].to_numpy()
    print("predict", out[["Label", "prob_1"]].to_numpy().round(3).tolist())
    assert prob.std() > 0.1 and len(set(out["pred"])) == 2       # not a constant classifier
    assert np.mean(out["pred"] == out["Label"]) >= 0.75, out[["Label", "prob_1"]]


def test_continued_pretraining_starts_from_the_demo_mae(demo_dir):
    """--init (issue 22): one epoch from the demo MAE scores far better on the held-out volumes than one from
    scratch (fresh optimizer and schedule both times): the weights are really used."""
    mae = os.path.join("output_dir", "demo_pretrain", "mae_pretrained.pth")
    ratios = {}
    recipe = ("--init", mae, "--blr", 0.016, "--warmup_epochs", 1)  # README, Continued pretraining
    for name, extra in (("scratch", ()), ("init", ("--init", mae)), ("recipe", recipe)):
        r = run_demo(demo_dir, "main_pretrain.py", "--epochs", 1, "--output_dir", f"output_dir/{name}", *extra)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        ratios[name] = log_lines(demo_dir / "output_dir" / name)[-1]["val_ratio"]
        if name == "init":  # the preset's peak lr was not typed: the run says what continued pretraining wants
            assert "a quarter of it" in r.stdout, r.stdout[-2000:]
    start = [x for x in log_lines(demo_dir / "output_dir" / "demo_pretrain") if "val_ratio" in x][-1]["val_ratio"]
    print("held-out ratio after one epoch", ratios, "of the demo MAE itself", start)
    assert "loaded 204 tensors" in r.stdout and "regenerated for grid (8, 8, 8)" in r.stdout
    # measured: scratch 1.33, init 0.70 (the demo MAE itself: 0.57; the fresh optimizer at the preset's peak lr
    # undoes part of it), the recipe (a quarter of the blr, 1 warmup epoch) keeps it
    assert ratios["scratch"] > 0.9 and ratios["init"] < 0.8, ratios
    assert ratios["recipe"] <= start + 0.02 and ratios["recipe"] < ratios["init"] - 0.03, (ratios, start)


def test_the_demo_ct_mae_carried_into_four_mri_channels_reconstructs_better_than_a_four_channel_one_from_scratch(
        demo_dir):
    """Issue 32: the 1-channel demo MAE (CT phantoms) carried into four MRI sequences (a study made from the MNI
    brain template, tests/mri_study.py; percentile-normalised, since the demo MAE's Sigmoid output wants [0, 1])
    scores a better held-out reconstruction after one epoch than the same 4-channel model from scratch."""
    from tests.mri_study import make_study

    study = make_study(demo_dir / "mri", 16)
    mae = os.path.abspath(os.path.join(demo_dir, "output_dir", "demo_pretrain", "mae_pretrained.pth"))
    ratios = {}
    demo = ("--model", "mae_vit_tiny_patch16", "--input_size", 64, "--patch_size", 8, "--batch_size", 4,
            "--num_workers", 0, "--device", "cpu", "--vis_every", 1, "--save_every", 0)  # the demo MAE's shape
    for name, extra in (("scratch", ("--blr", 0.064)), ("carried", ("--init", mae, "--blr", 0.016))):
        r = run_demo(demo_dir, "main_pretrain.py", "--data_path", study["train"], "--val_path", study["val"],
                     "--channels", "t1,t1ce,t2,flair", "--norm", "percentile", "--epochs", 1, "--warmup_epochs", 1,
                     "--output_dir", f"output_dir/mri_{name}", *demo, *extra)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        ratios[name] = log_lines(demo_dir / "output_dir" / f"mri_{name}")[-1]["val_ratio"]
    said = [x for x in r.stdout.splitlines() if "1-channel model" in x]
    assert said == [f"--init {mae} is a 1-channel model: its patch embedding kernel is replicated into each of the 4 "
                    f"channels with weight 1/4 (--channel_init replicate) and its reconstruction head repeated for "
                    f"every channel; every other weight is kept."]
    print("held-out ratio after one epoch on four MRI channels", ratios)
    # measured: scratch 2.17, carried 0.89 (the trivial reconstruction: 1.0)
    assert ratios["carried"] < 1.0 < ratios["scratch"] and ratios["carried"] < 0.6 * ratios["scratch"], ratios
