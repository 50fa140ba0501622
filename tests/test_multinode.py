"""Pretraining on two torchrun agents on one machine (`--nnodes 2 --nproc_per_node 1`, c10d rendezvous on
127.0.0.1, gloo), started as two separate processes as two machines would start them. Stopped by SIGTERM to one
agent, killed (SIGKILL to both agents and their workers) and, under `--max_restarts 1`, with one worker killed and
every worker restarted by the agents, each time continued by the same two commands: the run ends with the weights of
an uninterrupted two-agent run, and those are the weights of one agent running `--nproc_per_node 2` (data order,
masks and flips derive from seed, epoch, step and rank, not from where a rank runs)."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, load, state_dicts_equal, tiny_pretrain_args
from util.data.demo import make_demo_data

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch.distributed.run") is None,
                                reason="torchrun (torch.distributed.run) is missing")
EPOCHS = 3  # 8 volumes, 2 ranks x batch 1: 4 steps per epoch
SIGKILL_AT = "step:1:2"  # epoch 2 of 3, mid-epoch: rank 0 waits there while the test kills everything
RESTART_AT = "step:2:1"  # epoch 3 of 3: one worker is killed there, the agents restart both
WAIT_S = 240  # a stuck rendezvous or process group fails the test instead of hanging for torch's 30 minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agents:
    """`torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT --node_rank K
    main_pretrain.py ARGS` for K = 0, 1: two processes, each in its own session (a machine of its own), their
    output in log files the test can read while they run."""

    def __init__(self, args: list, folder: Path, env: dict | None = None, restarts: int = 0):
        port, self.logs = free_port(), [folder / f"agent{k}.log" for k in (0, 1)]
        self.run_id = f"mn{port}"
        folder.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        if "MAE3D_FAULT" not in (env or {}):
            full_env.pop("MAE3D_FAULT", None)
        self.procs = []
        for k, log in enumerate(self.logs):
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                     "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", self.run_id,
                     "--node_rank", str(k), "--max_restarts", str(restarts), "--monitor_interval", "0.2",
                     str(ROOT / "main_pretrain.py"), *map(str, args)],
                    env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True))

    def text(self) -> list[str]:
        return [log.read_text(errors="replace") for log in self.logs]

    def wait_for(self, line: str) -> int:
        """The index of the agent whose output (its worker's) shows `line` first."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for k, out in enumerate(self.text()):
                if line in out:
                    return k
            if all(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"no {line!r} in the agents' output:\n" + self.tail())

    def wait(self) -> list[int]:
        deadline = time.monotonic() + WAIT_S
        for p in self.procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"the agents did not finish in {WAIT_S} s:\n" + self.tail()) from None
        self.kill()  # nothing of theirs may outlive them (a worker would hold the output folder)
        return [p.returncode for p in self.procs]

    def workers(self) -> dict[int, int]:
        """{pid: parent pid} of this run's workers, found by the run id torchrun gives them (they run in sessions of
        their own and outlive a killed agent). Linux: /proc."""
        found, mark = {}, f"TORCHELASTIC_RUN_ID={self.run_id}".encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
        return found

    def kill(self) -> None:
        """SIGKILL to both agents and every worker at once, as when the nodes are lost or SLURM kills the job."""
        for pid in [p.pid for p in self.procs] + list(self.workers()):
            try:
                os.killpg(pid, signal.SIGKILL)  # each is the leader of its own session
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait()

    def tail(self) -> str:
        return "\n".join(f"--- agent {k}\n{out[-3000:]}" for k, out in enumerate(self.text()))


def status(out: Path) -> int | None:
    path = out / "exit_status.json"
    return json.loads(path.read_text())["status"] if path.exists() else None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    return make_demo_data(str(root / "demo_data"), n_pretrain=8, n_labeled=4, seed=5)["pretrain"]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """Final weights of the uninterrupted two-agent run."""
    folder = tmp_path_factory.mktemp("two_agents")
    agents = Agents(tiny_pretrain_args(data, folder / "out", epochs=EPOCHS, batch=1), folder)
    codes = agents.wait()
    assert codes == [0, 0], agents.tail()
    assert status(folder / "out") == 0
    return load(folder / "out" / "mae_pretrained.pth")["model"]


def test_two_agents_train_exactly_like_one_agent_with_two_processes(data, uninterrupted, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "main_pretrain.py"), *map(str, tiny_pretrain_args(data, out, epochs=EPOCHS,
                                                                                      batch=1))],
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=WAIT_S)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert state_dicts_equal(load(out / "mae_pretrained.pth")["model"], uninterrupted)


def test_sigterm_sigkill_and_a_restarted_worker_resume_to_the_uninterrupted_weights(data, uninterrupted, tmp_path):
    out = tmp_path / "out"
    args = tiny_pretrain_args(data, out, epochs=EPOCHS, batch=1, save_every_steps=1)

    # 1. SIGTERM to the agent that does not host rank 0 (what SLURM sends; its worker signals its own agent). The
    # agent forwards it to its worker, every rank stops at the same step, rank 0 writes the checkpoint and
    # exit_status.json. Both agents exit 1: the signalled one with torch's SignalException, the other because its
    # worker exited 75. A job script reads the file, not the agents' status.
    agents = Agents(args, tmp_path / "sigterm", {"MAE3D_FAULT": "term-parent@step:0:0", "MAE3D_FAULT_RANK": "1"})
    codes, text = agents.wait(), agents.text()
    assert codes == [1, 1], agents.tail()
    assert sum("SignalException" in t for t in text) == 1, agents.tail()
    stopped = [line for t in text for line in t.splitlines() if line.startswith("Stopped by SIGTERM at")]
    assert len(stopped) == 1 and "epoch 1/3" in stopped[0], agents.tail()  # printed once, by rank 0
    assert status(out) == 75
    ckpt = load(out / "checkpoint-last.pth")  # mid-epoch (step 2 or 3 of 4), or the epoch's end on a slow machine
    assert (ckpt["epoch"], ckpt.get("progress", {}).get("step", 4)) in ((0, 2), (0, 3), (1, 4)), ckpt.get("progress")

    # 2. The same commands resume; rank 0 waits at SIGKILL_AT (the other rank in the next collective) and the test
    # kills both agents and both workers with SIGKILL: no file says anything, checkpoint-last.pth is whole.
    agents = Agents(args, tmp_path / "sigkill", {"MAE3D_FAULT": f"slow@{SIGKILL_AT}", "MAE3D_FAULT_RANK": "0"})
    agents.wait_for(f"fault: slow at {SIGKILL_AT}")
    agents.kill()
    assert [p.returncode for p in agents.procs] == [-9, -9]
    assert sum(t.count("Resumed from") for t in agents.text()) == 1, agents.tail()
    assert status(out) is None and not (out / "mae_pretrained.pth").exists()
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 1 and ckpt["progress"]["step"] in (1, 2), (ckpt["epoch"], ckpt.get("progress"))

    # 3. The same commands with --max_restarts 1: one rank waits at RESTART_AT, the other's worker is killed
    # (SIGKILL) there. Its agent restarts it and counts one restart; the other agent restarts its healthy worker
    # for the membership change and counts none (torchrun counts restarts per agent), so the new workers' store
    # keys must not be named by that count. Both workers resume from the last checkpoint and finish.
    marker = tmp_path / "waited"
    agents = Agents(args, tmp_path / "restart", {"MAE3D_FAULT": f"slow@{RESTART_AT}", "MAE3D_FAULT_RANK": "0",
                                                  "MAE3D_FAULT_ONCE": str(marker)}, restarts=1)
    waiting = agents.wait_for(f"fault: slow at {RESTART_AT}")
    killed = [pid for pid, parent in agents.workers().items() if parent == agents.procs[1 - waiting].pid]
    assert len(killed) == 1
    os.kill(killed[0], signal.SIGKILL)
    codes, text = agents.wait(), agents.text()
    assert codes == [0, 0], agents.tail()
    assert sum(t.count("Resumed from") for t in text) == 2, agents.tail()  # at the start, after the restart
    assert status(out) == 0
    assert state_dicts_equal(load(out / "mae_pretrained.pth")["model"], uninterrupted)


def test_each_start_of_the_workers_gets_a_new_name_past_the_keys_of_dead_ones():
    """torchrun's agent store outlives the workers it restarts, with their keys (questions, answers, receipts): every
    rank of a new start learns rank 0's new name, whether rank 0 comes first (and reads the old questions) or
    last."""
    import datetime
    import threading

    import torch.distributed as dist

    from util.distributed import _group_name

    timeout = datetime.timedelta(seconds=60)
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)
    names = []
    for first in (0, 2, 0):  # the rank that arrives 0.3 s before the others
        got = {}

        def rank(r: int) -> None:
            if r != first:
                time.sleep(0.3)
            client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timeout)
            got[r] = _group_name(dist.PrefixStore("mae3d_start", client), r, 3)

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(got) == [0, 1, 2] and len(set(got.values())) == 1, got
        names.append(got[0])
    assert len(set(names)) == 3
