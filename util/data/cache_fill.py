"""Filling the preprocessed-volume cache as a step of its own (main_cache.py): parallel, resumable, several ranks.

Rows (an image and, optionally, its label map) come from one or more CSVs (with --shard, util.data.cache_rows
keeps this job's part). Under torchrun rank r takes rows r, r + W, ...; every rank feeds its rows lazily to its own
pool of worker processes (at most two rows per worker in flight, each worker holding one volume at a time,
SimpleITK and torch on one thread so the bytes written do not depend on the number of workers). A row whose entries
are already cached with an intact checksum is skipped, and entries are written atomically (util.atomic), so a
killed run restarted later completes the cache. A worker killed by the system (out of memory) fails its row only.
SIGTERM / SIGUSR1 (preemption) and Ctrl-C stop the fill: no new row starts, the workers are ended before this
process goes on (a worker also never writes an entry once its parent is gone), and the caller reports a stop.
Failed rows are listed with a one-sentence reason, which starts with the file that failed, in
`<cache_dir>/failures.csv` (Path, Mask, key, error; updated under a lock, so shards of one table can share it);
`known_failures` reads it back for pretraining's --skip_bad.
"""
from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import SimpleITK as sitk
import torch
import torch.distributed as dist

from util.data.cache_rows import (FAILURES_NAME, Row, drop_known_failures, known_failures,  # noqa: F401 - re-exported
                                  read_failures, read_rows, update_failures)
from util.data.input_dump import save_input
from util.distributed import all_gather_objects
from util.errors import user_message
from util.faults import fault_point
from util.runtime import available_cpus
from util.volume.cache import VolumeCache
from util.volume.io import VolumeError
from util.volume.channels import load_row, row_keys
from util.volume.preprocess import PreprocessConfig

ROW_ERRORS = (VolumeError, OSError, ValueError, RuntimeError, MemoryError)  # a bad row, never a stopped run
WORKER_DIED = "the worker process preprocessing it was killed (out of memory?); rerun with fewer --workers"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class Summary:
    """Totals of a fill over every rank; `failed` maps row index -> (error sentence, 'image' or 'mask')."""

    done: int = 0
    cached: int = 0
    bytes: int = 0
    seconds: float = 0.0
    work_seconds: float = 0.0
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)
    finished: list[int] = field(default_factory=list)  # rows whose outcome is known (done, cached or failed)
    stopped: str | None = None  # the signal that stopped the fill early ('SIGTERM', ...), else None

    def add(self, rec: dict) -> None:
        """Count one row's record (from `fill_row`)."""
        self.finished.append(rec["i"])
        if rec["status"] == "failed":
            self.failed[rec["i"]] = (rec["error"], rec["part"])
        else:
            setattr(self, rec["status"], getattr(self, rec["status"]) + 1)
        self.bytes += rec.get("bytes", 0)
        self.work_seconds += rec.get("seconds", 0.0) if rec["status"] == "done" else 0.0


def default_workers() -> int:
    """min(CPUs available, 16) worker processes, shared among torchrun's processes on this machine."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(available_cpus(), 16) // local)


def _reason(e: BaseException, row: Row) -> str:
    """The error's one sentence, starting with the file it is about (the image unless it names the mask)."""
    msg = user_message(e)
    if msg.startswith(row.path + ":") or (row.mask and msg.startswith(row.mask + ":")):
        return msg
    return f"{row.path}: {msg}"


def _entry_bytes(cache: VolumeCache, keys: list[tuple]) -> int:
    total = 0
    for k in keys:
        try:
            total += os.path.getsize(cache.path(k))
        except OSError:
            pass
    return total


def fill_row(row: Row, cfg: PreprocessConfig, cache: VolumeCache, save_inputs: str | None = None) -> dict:
    """Cache one row: {'status': 'done' | 'cached' | 'failed', 'bytes', 'seconds', and 'error', 'part' on failure}.

    When only the label map fails, the image is still cached (pretraining needs it) and the row fails with the
    mask's error. With `save_inputs` (a folder) the cached input of the row, windowed as training reads it, is
    written there for a person to look at (util.data.input_dump: <table>/rowNNNN_<scan>.nii.gz and .png). Never
    raises for a bad row.
    """
    out = _fill_row(row, cfg, cache)
    if save_inputs and out["status"] in ("done", "cached"):
        try:
            image, _ = load_row(row.input, cfg, cache, None, decoded=True, roi=row.roi)
            folder = os.path.join(save_inputs, os.path.splitext(os.path.basename(row.table))[0] or "table")
            save_input(folder, row.line, row.path, image, cfg, row.roi)
        except ROW_ERRORS as e:
            return {**out, "status": "failed", "part": "image", "error": f"--save_inputs: {_reason(e, row)}"}
    return out


def _fill_row(row: Row, cfg: PreprocessConfig, cache: VolumeCache) -> dict:
    t0 = time.perf_counter()
    if not row.path:
        return {"status": "failed", "part": "image", "error": f"{row.where}: has an empty 'Path' value; expected "
                                                              f"a file path."}
    if row.sources is not None and not all(s.path for s in row.sources):
        return {"status": "failed", "part": "image", "error": f"{row.where}: has an empty channel cell; expected a "
                                                              f"file path for each of {','.join(cfg.channel_names)}."}
    keys = row_keys(row.input, cfg, row.mask or None, row.roi)
    missing = [k for k in keys if not cache.verify(k)]
    if not missing:
        return {"status": "cached"}
    try:
        if row.mask and not os.path.exists(row.mask):
            raise VolumeError(f"{row.mask}: file not found.")
        load_row(row.input, cfg, cache, row.mask or None, decoded=False, roi=row.roi)
        return {"status": "done", "bytes": _entry_bytes(cache, missing), "seconds": time.perf_counter() - t0}
    except ROW_ERRORS as e:
        error = _reason(e, row)
    if cfg.roi:  # one box per row: name the row (its point is in the sentence)
        return {"status": "failed", "part": "image", "error": f"{row.where}: {error}"}
    if not row.mask or not error.startswith(row.mask + ":"):
        return {"status": "failed", "part": "image", "error": error}
    try:  # the label map failed: cache the image alone
        load_row(row.input, cfg, cache, None, decoded=False)
    except ROW_ERRORS as e:
        return {"status": "failed", "part": "image", "error": _reason(e, row)}
    image_keys = [k for k in missing if k[2] == "image"]
    return {"status": "failed", "part": "mask", "error": error, "bytes": _entry_bytes(cache, image_keys)}


# ---- worker processes -------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _exit_with_parent(parent: int) -> None:
    """Worker watchdog: exit within a second of the parent's death (a killed fill leaves no busy orphans).

    Not PR_SET_PDEATHSIG: it fires when the *thread* that forked the worker ends, and the pool forks replacement
    workers from a helper thread that ends at shutdown, killing idle workers that hold the pool's queue lock.
    """
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


class _WorkerCache(VolumeCache):
    """A worker's cache: it writes no entry once its parent is gone (the check comes after the entry's bytes are
    written and before the rename that makes it an entry); the worker then exits at once, without a traceback."""

    def __init__(self, cache_dir: str, parent: int) -> None:
        super().__init__(cache_dir)
        self.parent = parent

    def may_commit(self, tmp: str) -> None:
        if os.getppid() != self.parent:
            try:
                os.remove(tmp)
            finally:
                os._exit(1)


def _init_worker(cache_dir: str, cfg: PreprocessConfig, rows: list[Row], busy, parent: int,
                 save_inputs: str | None) -> None:
    """Pool initializer: one thread, ignore Ctrl-C (the parent stops the pool), die at SIGTERM / SIGUSR1 (how the
    parent stops the pool; not the parent's handlers, inherited through fork), exit with the parent, claim a slot of
    `busy` ([pid, row] pairs through which the parent learns which row a killed worker was on)."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    torch.set_num_threads(1)
    worker_signals()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    slot = -1
    with busy.get_lock():
        for s in range(len(busy) // 2):
            if busy[2 * s] == 0 or (busy[2 * s + 1] < 0 and not _alive(busy[2 * s])):
                busy[2 * s], busy[2 * s + 1], slot = os.getpid(), -1, s
                break
    _WORKER.update(cache=_WorkerCache(cache_dir, parent), cfg=cfg, rows=rows, busy=busy, slot=slot,
                   save_inputs=save_inputs)


def _fill_task(i: int) -> dict:
    """Worker side of one row: `fill_row` with the row index recorded in this worker's slot meanwhile."""
    w, s = _WORKER, _WORKER["slot"]
    if s >= 0:
        w["busy"][2 * s + 1] = i
    try:
        fault_point(f"cache:worker:{i}")
        return {**fill_row(w["rows"][i], w["cfg"], w["cache"], w["save_inputs"]), "i": i}
    finally:
        if s >= 0:
            w["busy"][2 * s + 1] = -1


def _dead_rows(busy) -> list[int]:
    """Rows whose worker died (its result will never come); their slots are freed."""
    out = []
    with busy.get_lock():
        for s in range(len(busy) // 2):
            pid, i = busy[2 * s], busy[2 * s + 1]
            if pid and i >= 0 and not _alive(pid):
                out.append(int(i))
                busy[2 * s], busy[2 * s + 1] = 0, -1
    return out


def _feed(share: Sequence[int], slots: threading.Semaphore, stop: threading.Event) -> Iterator[int]:
    """Row indices for the pool, one per free slot (so few rows are in flight); the fault point precedes each."""
    for i in share:
        while not slots.acquire(timeout=0.5):
            if stop.is_set():
                return
        fault_point(f"cache:row:{i}")
        yield i


class StopSignals:
    """While a fill runs: SIGTERM / SIGUSR1 (what SLURM sends before it preempts a job) are remembered (the first
    one's name in `signal`), said in one line, and set `event`; the previous handlers come back at exit."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.event = threading.Event()
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals keep their default action
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            print(f"{self.signal}: stopping the cache fill; rows in progress are left to the next run.", flush=True)
        self.event.set()

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @staticmethod
    @contextlib.contextmanager
    def blocked():
        """The stop signals blocked in this thread meanwhile: processes forked (and threads started) inside inherit
        the block, so a pool worker cannot catch a SIGTERM with this process's handler, or lose it, before its
        initializer restores the default action (`worker_signals`); one sent to this process waits until the end."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def worker_signals() -> None:
    """In a pool worker: Ctrl-C ignored (the parent stops the pool), SIGTERM / SIGUSR1 back to their default action
    (death: how the parent ends the pool), then unblocked, so one sent while the worker started is delivered now."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def fill_share(rows: list[Row], share: Sequence[int], cfg: PreprocessConfig, cache_dir: str, workers: int,
               bar=None, save_inputs: str | None = None) -> Summary:
    """Cache rows `share` of `rows` with a pool of `workers` processes; returns this process's Summary. A stop
    signal ends the loop: the pool's workers are ended and joined before this returns (`Summary.stopped`)."""
    out, t0 = Summary(), time.perf_counter()
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    busy = ctx.Array("q", [0, -1] * (2 * workers))
    slots = threading.Semaphore(2 * workers)
    with StopSignals() as stop:
        with stop.blocked():  # the workers and the pool's threads (which fork replacements) start with them blocked
            pool = ctx.Pool(workers, _init_worker, (cache_dir, cfg, rows, busy, os.getpid(), save_inputs))
        _run_pool(pool, rows, share, busy, slots, stop, out, bar)
    out.seconds, out.stopped = time.perf_counter() - t0, stop.signal
    return out


def _run_pool(pool, rows: list[Row], share: Sequence[int], busy, slots, stop: StopSignals, out: Summary, bar) -> None:
    """Feed `share` to `pool` and count what comes back into `out` until done or stopped; the pool is terminated
    (its workers SIGTERMed and joined) on the way out."""
    with pool:
        results = pool.imap_unordered(_fill_task, _feed(share, slots, stop.event))
        pending = len(share)
        try:
            while pending and stop.signal is None:
                try:
                    recs = [results.next(timeout=1.0)]
                except mp.TimeoutError:
                    recs = []
                if stop.signal is None:  # workers killed with the stop signal (a job's process group) failed nothing
                    recs += [{"i": i, "status": "failed", "part": "image",
                              "error": f"{rows[i].path}: {WORKER_DIED}."} for i in _dead_rows(busy)]
                for rec in recs:
                    out.add(rec)
                    slots.release()
                    pending -= 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(failed=len(out.failed), refresh=False)
        finally:
            stop.event.set()
    # Pool.__exit__ terminated (SIGTERM) and joined every worker: none is left to write an entry


# ---- several ranks, failures.csv ---------------------------------------------------------------------------------
def _wait_for_all_ranks() -> None:
    """Block until every rank finished its share: ranks of a long fill may end hours apart, beyond the process
    group's 30-minute timeout, so gloo's monitored barrier waits with a timeout of days."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(days=30), wait_all_ranks=True)
        else:
            dist.barrier()


def merge(parts: list[Summary]) -> Summary:
    """One Summary of every rank's (seconds: the slowest rank's)."""
    out = Summary()
    for p in parts:
        out.done, out.cached, out.bytes = out.done + p.done, out.cached + p.cached, out.bytes + p.bytes
        out.finished += p.finished
        out.stopped = out.stopped or p.stopped
        out.work_seconds += p.work_seconds
        out.seconds = max(out.seconds, p.seconds)
        out.failed.update(p.failed)
    return out


def fill_cache(rows: list[Row], cfg: PreprocessConfig, cache_dir: str, workers: int, rank: int = 0,
               world_size: int = 1, save_inputs: str | None = None) -> Summary:
    """Cache this rank's rows (rank, rank + world_size, ...), then gather the totals of every rank (all ranks
    get the same merged Summary). A progress bar with volumes/s and ETA is shown on rank 0. `save_inputs`: see
    fill_row."""
    from tqdm import tqdm

    share = range(rank, len(rows), world_size)
    with tqdm(total=len(share), unit="vol", desc=f"cache (rank 0 of {world_size})" if world_size > 1 else "cache",
              disable=rank != 0, dynamic_ncols=True, smoothing=0.05) as bar:
        mine = fill_share(rows, share, cfg, os.path.abspath(cache_dir), workers, bar,
                          os.path.abspath(save_inputs) if save_inputs else None)
    _wait_for_all_ranks()
    return merge(all_gather_objects(mine))
