"""Typed settings and the typed checkpoint record (issue 30): flags are resolved once into frozen settings; a run
clears and writes its own status file even when its output folder is a default; every checkpoint written before the
record existed still loads and resumes; every rank resumes from the same point."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

import main_finetune
import main_pretrain
from tests.helpers import load, run_in_process
from util.data.demo import make_demo_data
from util.errors import UserError
from util.task.record import CheckpointRecord, read_record

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_before_record.json"


def test_settings_are_frozen_and_typed():
    s = main_pretrain.parse_args(["--data_path", "x.csv", "--model", "mae_vit_tiny_patch16", "--input_size", "32",
                                  "--patch_size", "16", "--epochs", "3"])
    assert s.model.input_size == (32, 32, 32) and s.optim.epochs == 3 and s.run.output_dir.endswith("pretrain")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.optim = None
    f = main_finetune.parse_args(["--train_csv", "t.csv", "--label_columns", "A", "B"])
    assert f.label_columns == ("A", "B") and f.task.multi_label and f.run.output_dir == os.path.join("output_dir",
                                                                                                    "finetune")


def test_a_finetune_without_output_dir_clears_its_own_status_file_and_never_the_caches(tmp_path, monkeypatch):
    """Before, run_main cleared the status file before the default output folder was filled in: a failed finetune
    left the previous run's {"status": 0} behind, and with --cache_dir it removed the cache's status instead."""
    monkeypatch.chdir(tmp_path)
    stale = tmp_path / "output_dir" / "finetune" / "exit_status.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"status": 0, "meaning": "done"}))
    cache_status = tmp_path / "cache" / "exit_status.json"
    cache_status.parent.mkdir()
    cache_status.write_text(json.dumps({"status": 0, "meaning": "done"}))
    r = run_in_process("main_finetune.py", "--train_csv", tmp_path / "missing.csv", "--model", "vit_tiny_patch16",
                       "--input_size", 32, "--device", "cpu", "--num_workers", 0, "--cache_dir", tmp_path / "cache")
    assert r.returncode == 2 and "missing.csv" in r.stderr, r.stderr[-2000:]
    assert not stale.exists()  # a job script reading it must not think this failed run finished
    assert cache_status.exists()  # a file another run owns is never touched


def test_every_rank_must_resume_from_the_same_point(monkeypatch, tmp_path):
    from util.train import trainer
    from util.train.settings import RunOptions

    monkeypatch.setattr(trainer, "all_gather_objects", lambda p: [p, None])  # rank 1 sees an empty folder
    (tmp_path / "x").mkdir()
    rec = CheckpointRecord(weights={"w": torch.ones(1)}, epoch=2, optimizer={})
    monkeypatch.setattr(trainer, "find_resume", lambda folder: (str(tmp_path / "x" / "checkpoint-last.pth"), rec))
    with pytest.raises(UserError, match=r"rank 0 resumes from \('checkpoint-last.pth', 2, None\), rank 1 from "
                                        r"nothing; every process must see the same folder"):
        trainer.load_resume(RunOptions(output_dir=str(tmp_path / "x"), log_dir=str(tmp_path)), {})


def test_the_record_round_trips_and_keeps_the_keys_every_version_wrote():
    d = {"model": {"module.w": torch.ones(2)}, "optimizer": {"state": {}, "param_groups": []}, "epoch": 4,
         "scaler": {}, "args": {"smoothing": 0.1, "data_manifest": "m.csv.gz", "data_manifest_sha256": "ab"},
         "recipe": {"seed": 0}, "preprocess": {"size": [8, 8, 8]}, "progress": {"step": 3, "loss_sum": 1.5,
                                                                               "count": 3, "seen": [1, 2]}}
    rec = CheckpointRecord.from_dict(d)
    assert list(rec.weights) == ["w"] and rec.epoch == 4 and rec.progress.step == 3 and rec.smoothing == 0.1
    assert rec.data_manifest.name == "m.csv.gz" and rec.preprocess.size == (8, 8, 8) and rec.resumable
    out = rec.to_dict()
    assert sorted(out) == ["args", "epoch", "model", "optimizer", "preprocess", "progress", "recipe"]
    assert CheckpointRecord.from_dict(out).but(source="") == rec.but(source="")


# --- checkpoints written before the record -----------------------------------------------------------------------
def _rebuild(skeleton, data: str, runs: str, seed: int = 0):
    """An old checkpoint from its fixture: the exact key layout and plain values the earlier code wrote
    (tests/fixtures/checkpoints_before_record.json, made with the code of commit 422d938), tensors of the recorded
    shapes and dtypes (seeded weights; Adam moments that load; scalar values as recorded)."""
    gen = torch.Generator().manual_seed(seed)

    def build(o):
        if isinstance(o, dict) and "__tensor__" in o:
            dtype = getattr(torch, o["dtype"])
            if "value" in o:
                return torch.full(o["__tensor__"], o["value"], dtype=dtype)
            t = torch.randn(o["__tensor__"], generator=gen) * 0.02 if dtype.is_floating_point else \
                torch.zeros(o["__tensor__"], dtype=dtype)
            return t.to(dtype)
        if isinstance(o, dict):
            return {(int(k) if k.isdigit() else k): build(v) for k, v in o.items()}
        if isinstance(o, list):
            return [build(v) for v in o]
        if isinstance(o, str):
            return o.replace("DATA", data).replace("RUNS/", runs)
        return o

    ckpt = build(skeleton)
    for state in (ckpt.get("optimizer") or {}).get("state", {}).values():
        if "exp_avg_sq" in state:
            state["exp_avg_sq"] = state["exp_avg_sq"].abs()
    return ckpt


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    root = tmp_path_factory.mktemp("old")
    make_demo_data(str(root / "demo_data"), n_pretrain=6, n_labeled=12, seed=3)
    return root, json.loads(FIXTURES.read_text())


def _tiny(data, out):
    return ["--data_path", data, "--output_dir", out, "--model", "mae_vit_tiny_patch16", "--input_size", 32,
            "--epochs", 2, "--warmup_epochs", 1, "--batch_size", 2, "--num_workers", 0, "--device", "cpu",
            "--save_every", 1, "--vis_every", 0]


def test_an_old_mid_epoch_pretraining_checkpoint_resumes_and_finishes(old):
    root, fixtures = old
    out = root / "pt_mid"
    out.mkdir()
    ckpt = _rebuild(fixtures["pretrain_mid_epoch"], str(root / "demo_data"), f"{root}/")
    assert "preprocess" in ckpt["recipe"] and "window" in ckpt["args"]  # the old layout: preprocessing three times
    torch.save(ckpt, out / "checkpoint-last.pth")
    rec = read_record(out / "checkpoint-last.pth")
    assert rec.progress.step == 2 and rec.epoch == 0 and rec.preprocess.size == (32, 32, 32)
    r = run_in_process("main_pretrain.py", *_tiny(root / "demo_data" / "pretrain.csv", out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Resumed from" in r.stdout and "(epoch 1/2, step 2)" in r.stdout
    assert load(out / "checkpoint-last.pth")["epoch"] == 1


def test_an_old_finetuned_checkpoint_evaluates_and_an_old_mae_initialises(old):
    root, fixtures = old
    (root / "ft").mkdir()
    torch.save(_rebuild(fixtures["finetune_last"], str(root / "demo_data"), f"{root}/"),
               root / "ft" / "checkpoint-last.pth")
    rec = read_record(root / "ft" / "checkpoint-last.pth")
    assert rec.meta.task.name == "binary" and rec.best.metric == "auroc" and rec.smoothing == 0.1
    r = run_in_process("main_finetune.py", "--eval", "--resume", root / "ft" / "checkpoint-last.pth", "--val_csv",
                       root / "demo_data" / "val.csv", "--device", "cpu", "--num_workers", 0)
    assert r.returncode == 0 and "auroc" in json.loads((root / "ft" / "eval_metrics.json").read_text()), r.stderr
    (root / "pt").mkdir()
    torch.save(_rebuild(fixtures["mae_pretrained"], str(root / "demo_data"), f"{root}/"),
               root / "pt" / "mae_pretrained.pth")
    r = run_in_process("main_pretrain.py", *_tiny(root / "demo_data" / "pretrain.csv", root / "cont"), "--epochs", 1,
                       "--init", root / "pt" / "mae_pretrained.pth")
    assert r.returncode == 0 and "--init" in r.stdout and "loaded" in r.stdout, r.stderr[-2000:]
