"""A pretraining run killed with SIGKILL and restarted with the same command ends with the uninterrupted run's weights."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import load, run_script, state_dicts_equal, tiny_pretrain_args
from util.demo import make_demo_data

EPOCHS = 4
# Each restart dies at the next point: inside a step, while writing checkpoint-last, while writing a numbered
# checkpoint, at the first step of an epoch, and at the last step of the final epoch.
KILL_POINTS = ["step:0:2", "save_mid:checkpoint-last.pth", "step:1:3", "save_mid:checkpoint-1.pth", "step:2:0",
               "step:3:3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    return make_demo_data(str(root / "demo_data"), n_pretrain=8, n_labeled=8, seed=2)["pretrain"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    r = run_script("main_pretrain.py", *tiny_pretrain_args(data, out, epochs=EPOCHS))
    assert r.returncode == 0, r.stderr[-3000:]
    return load(out / "mae_pretrained.pth")["model"]


def test_killed_at_six_points_and_restarted_matches_uninterrupted_run(data, reference, tmp_path):
    out = tmp_path / "run"
    args = tiny_pretrain_args(data, out, epochs=EPOCHS)
    for point in KILL_POINTS:
        r = run_script("main_pretrain.py", *args, env={"MAE3D_FAULT": point})
        assert r.returncode == -9, f"expected SIGKILL at {point}, got {r.returncode}: {r.stderr[-2000:]}"
        assert not (out / "mae_pretrained.pth").exists()
        for ckpt in out.glob("checkpoint-*.pth"):  # whatever is on disk after a kill is complete and loadable
            assert "model" in load(ckpt)
    r = run_script("main_pretrain.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from" in r.stdout
    assert state_dicts_equal(load(out / "mae_pretrained.pth")["model"], reference)
    assert not list(out.glob(".*tmp*"))  # temporary files of killed writes are cleaned up


def test_corrupt_last_checkpoint_falls_back_to_newest_numbered(data, reference, tmp_path):
    out = tmp_path / "run"
    args = tiny_pretrain_args(data, out, epochs=EPOCHS)
    r = run_script("main_pretrain.py", *args, env={"MAE3D_FAULT": "step:3:0"})
    assert r.returncode == -9
    last = out / "checkpoint-last.pth"
    assert load(last)["epoch"] == 2
    last.write_bytes(last.read_bytes()[:1000])  # torn file, as after a disk failure
    r = run_script("main_pretrain.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WARNING" in r.stdout and "checkpoint-last.pth" in r.stdout
    assert "Resumed from" in r.stdout and "checkpoint-1.pth" in r.stdout
    assert state_dicts_equal(load(out / "mae_pretrained.pth")["model"], reference)


def test_torchrun_restarts_a_dead_worker_and_resumes(data, tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "fired"
    args = tiny_pretrain_args(data, out, epochs=3)
    env = {"MAE3D_FAULT": "step:1:1", "MAE3D_FAULT_RANK": "1", "MAE3D_FAULT_ONCE": str(marker)}
    import subprocess
    import sys

    from tests.helpers import ROOT

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(ROOT / "main_pretrain.py"), *map(str, args)]
    import os

    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", **env), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert marker.exists()  # the worker really died once
    assert "Resumed from" in r.stdout and "finished epoch 0" in r.stdout
    assert load(out / "checkpoint-last.pth")["epoch"] == 2
    assert torch.isfinite(load(out / "mae_pretrained.pth")["model"]["cls_token"]).all()
