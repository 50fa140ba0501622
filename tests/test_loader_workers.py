"""Loader worker processes (util.train.trainer.worker_init): a stop signal from anyone but their parent leaves them
serving batches, and nothing they do keeps the training process from exiting."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="sigwaitinfo is Linux-only")

SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from util.train.trainer import worker_init

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 12
        def __getitem__(self, i):
            if sys.argv[1] == "fail":
                raise ValueError(f"item {i} is bad")
            time.sleep(0.05)
            return torch.full((2,), float(i))

    loader = torch.utils.data.DataLoader(Items(), batch_size=2, num_workers=2, worker_init_fn=worker_init)
    if sys.argv[1] == "fail":
        try:
            next(iter(loader))
        except ValueError as e:
            kept = e  # the traceback holds the iterator in a reference cycle until the interpreter exits
        print("caught", flush=True)
    else:
        it = iter(loader)
        first = next(it)
        print(*[w.pid for w in it._workers], flush=True)
        sys.stdin.readline()  # the test signals the workers meanwhile
        print("sum", float(sum(b.sum() for b in [first, *it])), flush=True)
""")


def launch(mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The process's output once it has exited; the whole group is killed if it has not within `timeout`."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the process did not exit within {timeout} s")


def test_a_loader_left_in_an_exception_does_not_hang_the_exit():
    """A worker error leaves the iterator alive until exit, where multiprocessing terminates (SIGTERM from the
    parent) and joins the workers: with SIGTERM ignored outright this never returned (a CI run hung after its
    tests had passed)."""
    proc = launch("fail")
    out = finish(proc, timeout=60)
    assert proc.returncode == 0 and "caught" in out, out


def test_sigterm_from_another_process_leaves_the_workers_serving_batches():
    proc = launch("serve")
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2, pids
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGUSR1)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out = finish(proc, timeout=60)
    assert proc.returncode == 0, out
    assert f"sum {2.0 * sum(range(12))}" in out, out  # every batch arrived
