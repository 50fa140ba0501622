"""One run per output folder (an exclusive lock, stale locks ignored) and no silent recipe change on resume."""
from __future__ import annotations

import json
import os

import pytest

from tests.helpers import load, run_in_process, tiny_pretrain_args
from util.data.demo import make_demo_data
from util.train.run_lock import RunLock


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_data(str(tmp_path_factory.mktemp("lock") / "demo_data"), n_pretrain=4, n_labeled=4,
                          seed=5)["pretrain"]


def error_line(r) -> str:
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def test_a_second_run_into_a_busy_folder_is_refused_naming_the_holder(data, tmp_path):
    out = tmp_path / "run"
    with RunLock(str(out)).acquire():  # another run holds the folder (this process plays it)
        r = run_in_process("main_pretrain.py", *tiny_pretrain_args(data, out, epochs=1, size=16))
        msg = error_line(r)
        assert str(out) in msg and f"pid {os.getpid()}" in msg and "in use by another run" in msg
        assert not (out / "log.txt").exists() and not list(out.glob("checkpoint-*"))
    (out / ".run.lock").write_text(json.dumps({"pid": 999999, "host": "gone"}))  # stale: nobody holds it
    r = run_in_process("main_pretrain.py", *tiny_pretrain_args(data, out, epochs=1, size=16))
    assert r.returncode == 0, r.stderr[-2000:]
    assert len((out / "log.txt").read_text().splitlines()) == 1 and not (out / ".run.lock").exists()


def test_resuming_with_another_recipe_is_refused_unless_asked(data, tmp_path):
    out = tmp_path / "run"
    assert run_in_process("main_pretrain.py", *tiny_pretrain_args(data, out, epochs=1, size=16)).returncode == 0
    before = (out / "checkpoint-last.pth").read_bytes()
    changed = tiny_pretrain_args(data, out, epochs=2, size=16, seed=1, blr=0.01)
    msg = error_line(run_in_process("main_pretrain.py", *changed))
    assert "another recipe" in msg and "seed 0 -> 1" in msg and "lr " in msg and "--allow_recipe_change" in msg
    assert (out / "checkpoint-last.pth").read_bytes() == before  # nothing was written
    r = run_in_process("main_pretrain.py", *changed, "--allow_recipe_change")
    assert r.returncode == 0 and "changed recipe" in r.stdout, r.stderr[-2000:]
    assert load(out / "checkpoint-last.pth")["epoch"] == 1
    longer = tiny_pretrain_args(data, out, epochs=3, size=16, seed=1, blr=0.01)  # more epochs: the same recipe
    assert run_in_process("main_pretrain.py", *longer).returncode == 0
