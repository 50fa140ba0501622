"""main_cache.py under SIGTERM (what SLURM sends before it preempts a job), alone and under torchrun: the workers
stop with it, no entry is written once it is gone, no traceback, exit_status.json says 75 (preempted), and the same
command run again resumes and completes the cache."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from helpers import ROOT, write_noise_ct_table as write_table

SUMMARY = re.compile(r"(\d+) done \(newly cached\), (\d+) already cached, (\d+) failed")


def entries(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*.vol")}


def processes_using(marker: str) -> list[int]:
    """Live processes whose command line names `marker` (a test's own cache folder)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore"):
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


def start(args: list, slow_rows: list[int], torchrun: int = 0) -> tuple[subprocess.Popen, list[str], threading.Event,
                                                                       threading.Thread]:
    """main_cache.py whose workers pause 3 s before each of `slow_rows` (a window for the signal); returns the
    process, its stderr lines as they come and an event set once a worker is in such a pause."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               MAE3D_FAULT=",".join(f"slow@cache:worker:{i}" for i in slow_rows))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    p = subprocess.Popen([*launcher, str(ROOT / "main_cache.py"), *map(str, args)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    lines, paused = [], threading.Event()

    def read():
        for line in p.stderr:
            lines.append(line)
            if "fault: slow at cache:worker:" in line:
                paused.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return p, lines, paused, reader


def stop_and_check(p, lines, paused, reader, cache: Path) -> str:
    """SIGTERM once a worker pauses; then: status 75 in exit_status.json, no traceback, no worker left, and no
    entry written in the 5 s after the process is gone (the paused worker would have written one within 3 s)."""
    assert paused.wait(120), "".join(lines)
    os.kill(p.pid, signal.SIGTERM)
    # not communicate(): it would read stderr too and take lines from the reader thread. The pipes reach their end
    # when every process holding them (under torchrun: the agent and both ranks) has exited.
    outs: list[str] = []
    out_reader = threading.Thread(target=lambda: outs.append(p.stdout.read()), daemon=True)
    out_reader.start()
    p.wait(timeout=120)
    out_reader.join(120)
    reader.join(120)
    assert not out_reader.is_alive() and not reader.is_alive(), "a process still held the pipes 120 s after the stop"
    out = outs[0]
    err = "".join(lines)
    at_exit = entries(cache)
    time.sleep(5)
    assert entries(cache) == at_exit, "an entry was written after main_cache.py had exited"
    assert not processes_using(str(cache)), "a worker outlived main_cache.py"
    status = json.loads((cache / "exit_status.json").read_text())
    assert status["status"] == 75 and "preempted" in status["meaning"] and "SIGTERM" in status["message"], status
    assert "BrokenPipe" not in err and not re.search(r"File \".*(main_cache|cache_fill)\.py\"", err), err
    return out + err


def resume(table: Path, cache: Path, n: int, before: int, *flags) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MAE3D_FAULT", None)
    r = subprocess.run([sys.executable, str(ROOT / "main_cache.py"), "--csv", str(table), "--cache_dir", str(cache),
                        "--input_size", "8", *flags], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert SUMMARY.findall(r.stdout) == [(str(n - before), str(before), "0")], r.stdout
    assert len(entries(cache)) == n and json.loads((cache / "exit_status.json").read_text())["status"] == 0


def test_sigterm_stops_the_workers_writes_status_75_and_a_rerun_resumes(tmp_path):
    table, cache = write_table(tmp_path, 5), tmp_path / "cache"
    p, *watch = start(["--csv", table, "--cache_dir", cache, "--input_size", 8, "--workers", 1], [2, 3, 4])
    text = stop_and_check(p, *watch, cache)
    assert p.returncode == 75, text
    assert "Stopped by SIGTERM: 3 of 5 rows not done yet" in text and "rerun the same command" in text
    done = len(entries(cache))
    assert done == 2  # rows 0 and 1; row 2 was in its pause, abandoned
    resume(table, cache, 5, done)


def test_sigterm_to_torchrun_stops_both_ranks_and_a_rerun_resumes(tmp_path):
    table, cache = write_table(tmp_path, 6), tmp_path / "cache"
    p, *watch = start(["--csv", table, "--cache_dir", cache, "--input_size", 8, "--workers", 1], [4, 5], torchrun=2)
    text = stop_and_check(p, *watch, cache)  # the agent forwards SIGTERM to both ranks
    assert "Cache fill stopped by SIGTERM" in text, text
    done = len(entries(cache))
    assert 2 <= done <= 4  # rows 0-3 (two per rank) at most; rows 4 and 5 were paused
    resume(table, cache, 6, done)


def _write_as_orphan(cache_dir: str, src: str) -> None:
    from util.data.cache_fill import _WorkerCache

    cache = _WorkerCache(cache_dir, parent=os.getppid() + 10 ** 7)  # a parent that is not ours: it is gone
    cache.put((src, "cfg"), np.zeros((4, 4, 4), np.float32))


def test_a_worker_whose_parent_is_gone_writes_no_entry(tmp_path):
    """The guarantee behind 'no entry after the parent is gone' when the parent dies without a word (SIGKILL): the
    check sits between writing the entry's bytes and the rename that makes them an entry."""
    import multiprocessing as mp

    src = tmp_path / "src.txt"
    src.write_text("x")
    from util.volume.cache import VolumeCache

    VolumeCache(tmp_path / "c")  # the folder's settings, as main_cache.py writes them before its workers start
    p = mp.get_context("fork").Process(target=_write_as_orphan, args=(str(tmp_path / "c"), str(src)))
    p.start()
    p.join(60)
    assert p.exitcode == 1 and [f.name for f in (tmp_path / "c").rglob("*") if f.is_file()] == ["cache_format.json"]


def _worker_like() -> None:
    from util.data.cache_fill import worker_signals

    time.sleep(0.5)  # a worker still starting (imports, the pool's bootstrap) when the signal comes
    worker_signals()  # what every pool worker's initializer does first
    time.sleep(30)


def test_a_pool_worker_signalled_as_it_starts_still_dies():
    """Pool.terminate() SIGTERMs workers that may have just been forked (a replacement for a killed one): a SIGTERM
    at any moment of a worker's start must end it, neither caught by the handler inherited from main_cache.py nor
    lost in the fork (the pool then waited for it forever)."""
    import multiprocessing as mp

    from util.data.cache_fill import StopSignals

    with StopSignals() as stop:
        for delay in (0.0, 0.1, 1.0):  # during the start, and after it
            with stop.blocked():  # as main_cache.py starts its pool
                p = mp.get_context("fork").Process(target=_worker_like)
                p.start()
            time.sleep(delay)
            os.kill(p.pid, signal.SIGTERM)
            p.join(20)
            alive = p.is_alive()
            if alive:
                p.kill()
            assert not alive and p.exitcode == -signal.SIGTERM, delay
    assert stop.signal is None  # this process was not stopped
