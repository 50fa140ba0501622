"""main_finetune.py on 2 CPU ranks (torchrun, gloo): gathered metrics equal the 1-process metrics, no duplicates."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import main_finetune
from tests.helpers import load, run_script


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """Demo phantoms; the val CSV gets an odd row count so a padding sampler would duplicate one volume."""
    from util.data.demo import make_demo_data

    root = tmp_path_factory.mktemp("ftd")
    paths = make_demo_data(str(root / "demo_data"), n_pretrain=4, n_labeled=20, seed=1)
    val = pd.read_csv(paths["val"])
    odd = val.iloc[: len(val) - 1 + len(val) % 2]
    assert len(odd) % 2 == 1
    odd.to_csv(Path(paths["val"]).with_name("val_odd.csv"), index=False)
    return {**paths, "val_odd": str(Path(paths["val"]).with_name("val_odd.csv")), "cache": str(root / "cache")}


def flags(demo, out, *extra) -> list[str]:
    args = ["--train_csv", demo["train"], "--val_csv", demo["val_odd"], "--output_dir", out, "--model",
            "vit_tiny_patch16", "--input_size", 32, "--epochs", 1, "--warmup_epochs", 1, "--batch_size", 2,
            "--num_workers", 0, "--device", "cpu", "--print_freq", 1, "--cache_dir", demo["cache"], *extra]
    return [str(a) for a in args]


def eval_1proc(demo, ckpt: Path, out: Path) -> dict:
    main_finetune.cli_main(["--eval", "--resume", str(ckpt), "--val_csv", demo["val_odd"], "--metrics_json", str(out),
                            "--num_workers", "0", "--device", "cpu", "--cache_dir", demo["cache"]])
    return json.loads(out.read_text())


def test_two_rank_training_with_accumulation_records_the_one_process_metrics(demo, tmp_path):
    out = tmp_path / "ddp"
    r = run_script("main_finetune.py", *flags(demo, out, "--accum_iter", 2), torchrun=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert len(lines) == 1  # rank 0 alone writes
    recorded = load(out / "checkpoint-last.pth")["metrics"]
    single = eval_1proc(demo, out / "checkpoint-last.pth", tmp_path / "one.json")
    n_val = len(pd.read_csv(demo["val_odd"]))
    assert recorded["n"] == single["n"] == n_val  # every volume once: no padded duplicates
    for k in ("auroc", "accuracy", "balanced_accuracy", "f1"):
        assert recorded[k] == pytest.approx(single[k], abs=1e-9, nan_ok=True), k
    assert recorded["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_two_rank_segmentation_eval_sums_dice_counts_like_one_process(demo, tmp_path):
    out = tmp_path / "seg"
    main_finetune.cli_main(flags(demo, out, "--task", "segmentation", "--feature_size", 8))
    ckpt = out / "checkpoint-last.pth"
    single = eval_1proc(demo, ckpt, tmp_path / "one.json")
    r = run_script("main_finetune.py", "--eval", "--resume", ckpt, "--val_csv", demo["val_odd"], "--metrics_json",
                   tmp_path / "two.json", "--num_workers", 0, "--device", "cpu", "--cache_dir", demo["cache"],
                   torchrun=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["n"] == single["n"] == len(pd.read_csv(demo["val_odd"]))
    for k in single:
        if k.startswith("dice"):
            assert two[k] == pytest.approx(single[k], abs=1e-12, nan_ok=True), k
    assert two["loss"] == pytest.approx(single["loss"], rel=1e-5)
