"""What a job script can rely on: exit statuses and exit_status.json, a second Ctrl-C during a checkpoint write,
and one log.txt line per epoch after a failed checkpoint write and a resume."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import util.checkpoint
from tests.helpers import ROOT, load, run_in_process, tiny_pretrain_args
from util.data.demo import make_demo_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("status")
    return make_demo_data(str(root / "demo_data"), n_pretrain=8, n_labeled=8, seed=4)["pretrain"]


def status(folder) -> dict | None:
    path = folder / "exit_status.json"
    return json.loads(path.read_text()) if path.exists() else None


def logged_epochs(folder) -> list[int]:
    return [json.loads(line)["epoch"] for line in (folder / "log.txt").read_text().splitlines()]


def test_failed_checkpoint_write_then_resume_logs_each_epoch_once(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = tiny_pretrain_args(data, out, epochs=3, save_every=5)
    real, writes = util.checkpoint.save_atomic, []

    def disk_full_at_second_epoch(obj, path):
        writes.append(os.path.basename(path))
        if len(writes) == 2:  # the end of epoch 2: its log line is written, its checkpoint is not
            raise OSError(errno.ENOSPC, f"Could not write checkpoint {path}: No space left on device")
        real(obj, path)

    monkeypatch.setattr(util.checkpoint, "save_atomic", disk_full_at_second_epoch)
    r = run_in_process("main_pretrain.py", *args)
    assert r.returncode == 2 and "No space left on device" in r.stderr, r.stderr[-2000:]
    assert load(out / "checkpoint-last.pth")["epoch"] == 0  # epoch 1 (counted from 1) is the last one on disk
    assert logged_epochs(out) == [1, 2]  # epoch 2 was logged before its write failed
    assert status(out) is None  # a failed run records no planned end
    monkeypatch.setattr(util.checkpoint, "save_atomic", real)
    r = run_in_process("main_pretrain.py", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Resumed from" in r.stdout and "removed 1 line(s) of epochs after epoch 1" in r.stdout
    assert logged_epochs(out) == [1, 2, 3]
    assert status(out)["status"] == 0


def test_preempted_run_records_75_after_its_checkpoint_and_the_next_run_replaces_it(data, tmp_path):
    out = tmp_path / "run"
    args = tiny_pretrain_args(data, out, epochs=2)
    r = run_in_process("main_pretrain.py", *args, env={"MAE3D_FAULT": "term@step:0:1"})
    assert r.returncode == 75, r.stderr[-2000:]
    s = status(out)
    assert s["status"] == 75 and "preempted" in s["meaning"] and "checkpoint-last.pth" in s["message"]
    assert load(out / "checkpoint-last.pth")["progress"]["step"] == 2  # on disk before the status was written
    r = run_in_process("main_pretrain.py", *args, "--model", "mae_vit_small_patch16")  # refused: another recipe
    assert r.returncode == 2 and status(out) is None  # the stale 75 is gone: a job script must not requeue
    r = run_in_process("main_pretrain.py", *args)
    assert r.returncode == 0 and status(out)["status"] == 0 and not status(out)["torchrun"]


def test_second_ctrl_c_during_the_checkpoint_write_lets_it_finish_and_exits_130(data, tmp_path):
    """Ctrl-C, then Ctrl-C three more times while the stop's checkpoint is being written (held open 3 s)."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               MAE3D_FAULT="int@step:1:1,slow@save_mid:checkpoint-last.pth")
    cmd = [sys.executable, str(ROOT / "main_pretrain.py"), *map(str, tiny_pretrain_args(data, out, epochs=3))]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = []
    try:
        for line in p.stderr:  # the epoch-end write of epoch 1 is held too; the one after Ctrl-C is the stop's
            err.append(line)
            if line.startswith("fault: slow") and out.joinpath("checkpoint-last.pth").exists():
                break
        for _ in range(3):
            time.sleep(0.3)
            p.send_signal(signal.SIGINT)
        rest_out, rest_err = p.communicate(timeout=120)
    finally:
        p.kill()
    stderr = "".join(err) + rest_err
    assert p.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "terminate called" not in stderr and "Fatal" not in stderr, stderr[-3000:]
    assert stderr.count("Interrupted (Ctrl-C)") == 1, stderr[-3000:]
    ckpt = load(out / "checkpoint-last.pth")  # the write that was under way finished: the stop position is on disk
    assert ckpt["epoch"] == 1 and ckpt["progress"]["step"] == 2, (ckpt["epoch"], ckpt.get("progress"))
    assert not list(out.glob(".tmp-*")) and status(out)["status"] == 130
