"""A pretraining run killed with SIGKILL and restarted with the same command ends with the uninterrupted run's weights."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import load, run_in_process, run_script, state_dicts_equal, tiny_pretrain_args
from util.data.demo import make_demo_data

EPOCHS = 4
# Each restart dies at the next point: inside a step, while writing checkpoint-last, while writing a numbered
# checkpoint, at the first step of an epoch, and at the last step of the final epoch.
KILL_POINTS = ["step:0:2", "save_mid:checkpoint-last.pth", "step:1:3", "save_mid:checkpoint-2.pth", "step:2:0",
               "step:3:3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    return make_demo_data(str(root / "demo_data"), n_pretrain=8, n_labeled=8, seed=2)["pretrain"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    r = run_in_process("main_pretrain.py", *tiny_pretrain_args(data, out, epochs=EPOCHS))
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
    r = run_in_process("main_pretrain.py", *args)
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
    assert load(last)["epoch"] in (1, 2)  # epoch 2's file may still have been in its background write
    last.write_bytes(last.read_bytes()[:1000])  # torn file, as after a disk failure
    r = run_in_process("main_pretrain.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WARNING" in r.stdout and "checkpoint-last.pth" in r.stdout
    assert "Resumed from" in r.stdout and "checkpoint-2.pth" in r.stdout
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
    assert "Resumed from" in r.stdout and "after epoch 1 of 3" in r.stdout
    assert load(out / "checkpoint-last.pth")["epoch"] == 2
    assert torch.isfinite(load(out / "mae_pretrained.pth")["model"]["cls_token"]).all()


def test_sigterm_sigusr1_and_ctrl_c_write_a_mid_epoch_checkpoint_and_the_rerun_matches(data, reference, tmp_path):
    out = tmp_path / "run"
    args = tiny_pretrain_args(data, out, epochs=EPOCHS)
    # the signal arrives during a step: that step and the next finish (the decision is read one step late),
    # the position inside the epoch is saved, one line says so, and the documented exit status follows
    for point, code, name in (("term@step:1:1", 75, "SIGTERM"), ("usr1@step:2:0", 75, "SIGUSR1"),
                              ("int@step:2:2", 130, "Ctrl-C")):
        r = run_in_process("main_pretrain.py", *args, env={"MAE3D_FAULT": point})  # signals reach our handler
        assert r.returncode == code, (point, r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr
        stop = [line for line in r.stderr.splitlines() if line.startswith("Stopped by")]
        assert len(stop) == 1 and name in stop[0] and "checkpoint-last.pth" in stop[0], r.stderr[-2000:]
        ckpt = load(out / "checkpoint-last.pth")
        epoch, step = int(point.split(":")[1]), int(point.split(":")[2])
        assert ckpt["epoch"] == epoch and ckpt["progress"]["step"] == step + 1, (point, ckpt["epoch"], ckpt["progress"])
    r = run_in_process("main_pretrain.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resumed from {out / 'checkpoint-last.pth'} (epoch 3/{EPOCHS}, step 3)" in r.stdout
    assert state_dicts_equal(load(out / "mae_pretrained.pth")["model"], reference)


def test_mid_epoch_checkpoints_by_steps_survive_sigkill_anywhere(data, reference, tmp_path):
    out = tmp_path / "run"
    args = tiny_pretrain_args(data, out, epochs=EPOCHS, save_every_steps=1)
    for point in ("step:0:3", "step:1:2", "save_mid:checkpoint-last.pth", "step:3:1"):
        r = run_script("main_pretrain.py", *args, env={"MAE3D_FAULT": point})
        assert r.returncode == -9, (point, r.stderr[-2000:])
        assert (out / ".run.lock").exists()  # left by the killed run: it must not block the restart
        if point == "step:1:2":  # checkpoints are written in the background, one at a time: the write after
            ckpt = load(out / "checkpoint-last.pth")  # step 0 was on disk before the one after step 1 began
            assert ckpt["epoch"] == 1 and ckpt["progress"]["step"] in (1, 2), ckpt.get("progress")
    r = run_in_process("main_pretrain.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from" in r.stdout
    assert state_dicts_equal(load(out / "mae_pretrained.pth")["model"], reference)


def _torchrun(args, env=None, restarts=0):
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", str(ROOT / "main_pretrain.py"), *map(str, args)]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), capture_output=True,
                          text=True, timeout=600)


def test_torchrun_mid_epoch_sigterm_kill_and_restart_end_with_the_uninterrupted_weights(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("kill16")
    data = make_demo_data(str(root / "demo_data"), n_pretrain=16, n_labeled=8, seed=3)["pretrain"]
    ref = tmp_path / "ref"
    r = _torchrun(tiny_pretrain_args(data, ref, epochs=3))  # 16 volumes, 2 ranks x batch 2: 4 steps per epoch
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = tmp_path / "run"
    args = tiny_pretrain_args(data, out, epochs=3, save_every_steps=2)
    # SIGTERM to the torchrun agent (as SLURM sends it): it forwards it, every worker stops at the same step
    r = _torchrun(args, {"MAE3D_FAULT": "term-parent@step:0:1", "MAE3D_FAULT_RANK": "0"})
    assert r.returncode != 0 and "Stopped by SIGTERM at epoch 1/3" in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.returncode == 1 and "SignalException" in r.stderr  # torch's agent: status 1 after SIGTERM, always
    assert json.loads((out / "exit_status.json").read_text())["status"] == 75  # what a job script reads instead
    ckpt = load(out / "checkpoint-last.pth")  # the agent forwards the signal within a step or two: mid-epoch at
    assert ckpt["epoch"] == 0 and ckpt.get("progress", {"step": 4})["step"] in (3, 4)  # step 3, else epoch end
    # rerun: it resumes mid-epoch; then rank 0 is killed (SIGKILL) inside epoch 1 and torchrun restarts both
    # workers, which resume from the mid-epoch checkpoint again
    marker = tmp_path / "fired"
    r = _torchrun(args, {"MAE3D_FAULT": "step:1:3", "MAE3D_FAULT_RANK": "0", "MAE3D_FAULT_ONCE": str(marker)}, 1)
    assert r.returncode == 0 and marker.exists(), r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("Resumed from") == 2  # at the start, and after the restart
    assert json.loads((out / "exit_status.json").read_text())["status"] == 0
    assert state_dicts_equal(load(out / "mae_pretrained.pth")["model"], load(ref / "mae_pretrained.pth")["model"])


def test_timed_saves_across_ranks_come_once_per_period_and_restart_after_any_save(monkeypatch):
    """The ranks' flags are combined one step late; a save must void the flag already in flight."""
    import torch.distributed as dist

    import util.train.preempt as preempt

    class Done:
        def wait(self):
            return None

    clock = [0.0]
    monkeypatch.setattr(preempt, "is_dist", lambda: True)
    monkeypatch.setattr(preempt, "is_main_process", lambda: True)
    monkeypatch.setattr(preempt.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None, async_op=False: Done())
    control = preempt.StepControl("cpu", save_every_minutes=1.0)
    try:
        saves = []
        for step in range(1, 40):
            clock[0] += 7.0  # seconds per step: due every 60 s, i.e. every 9th step
            save, stop = control.decide(step)
            assert not stop
            if save:
                saves.append(step)
                control.saved()
        gaps = [b - a for a, b in zip(saves, saves[1:])]
        assert len(saves) >= 3 and all(g >= 8 for g in gaps), saves  # never two saves in a row
    finally:
        control.close()
