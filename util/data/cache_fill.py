"""Filling the preprocessed-volume cache as a step of its own (main_cache.py): parallel, resumable, several ranks.

Rows (an image and, optionally, its label map) come from one or more CSVs. Under torchrun rank r takes rows
r, r + W, ...; every rank feeds its rows lazily to its own pool of worker processes (at most two rows per worker in
flight, each worker holding one volume at a time, SimpleITK and torch on one thread so the bytes written do not
depend on the number of workers). A row whose entries are already cached and readable is skipped, and entries are
written atomically (util.atomic), so a killed run restarted later completes the cache. A worker killed by the
system (out of memory) fails its row only. Failed rows are listed with a one-sentence reason, which starts with
the file that failed, in `<cache_dir>/failures.csv` (Path, Mask, key, error); `known_failures` reads it back for
pretraining's --skip_bad.
"""
from __future__ import annotations

import csv
import datetime
import io
import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import pandas as pd
import SimpleITK as sitk
import torch
import torch.distributed as dist

from util.atomic import write_text
from util.volume.cache import VolumeCache
from util.distributed import all_gather_objects
from util.errors import UserError, user_message
from util.faults import fault_point
from util.data.path_table import find_column, read_csv_table, resolve_paths, roi_points, where
from util.volume.preprocess import PreprocessConfig, cache_keys, load_cached
from util.runtime import available_cpus
from util.volume.io import VolumeError

FAILURES_NAME = "failures.csv"
FAILURE_COLUMNS = ("Path", "Mask", "key", "error")
ROW_ERRORS = (VolumeError, OSError, ValueError, RuntimeError, MemoryError)  # a bad row, never a stopped run
WORKER_DIED = "the worker process preprocessing it was killed (out of memory?); rerun with fewer --workers"


class Row(NamedTuple):
    """One volume to cache: absolute image path ("" when the cell was empty), label-map path or "", and where."""

    path: str
    mask: str
    where: str
    roi: object = None  # ROI settings: the row's point (x, y, z) or its Mask path (the box's centre)


@dataclass
class Summary:
    """Totals of a fill over every rank; `failed` maps row index -> (error sentence, 'image' or 'mask')."""

    done: int = 0
    cached: int = 0
    bytes: int = 0
    seconds: float = 0.0
    work_seconds: float = 0.0
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)

    def add(self, rec: dict) -> None:
        """Count one row's record (from `fill_row`)."""
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


def read_rows(csv_paths: Sequence[str], masks: bool = True, cfg: PreprocessConfig | None = None) -> list[Row]:
    """The rows of every table, paths resolved but not checked (a missing file fails its row only).

    Duplicated (Path, Mask) pairs are kept once (with ROI settings: duplicated boxes, each row's point or its Mask
    being its centre). Raises UserError naming the table when it cannot be read, has no Path column, no data rows
    or, with ROI settings, no coordX/Y/Z (or Mask) column (FileNotFoundError when it does not exist).
    """
    roi = cfg is not None and cfg.roi
    masks = masks or (roi and cfg.roi_label is not None)
    rows, seen = [], set()
    for csv_path in csv_paths:
        csv_path = os.path.abspath(os.fspath(csv_path))
        df = read_csv_table(csv_path)
        col, mcol = find_column(df, "Path"), find_column(df, "Mask") if masks else None
        if col is None:
            raise UserError(f"{csv_path}: has no 'Path' column (columns: {', '.join(map(str, df.columns))}); "
                             f"expected a header row with Path (and optionally Mask).")
        if len(df) == 0:
            raise UserError(f"{csv_path}: has no data rows; expected one row per volume.")
        paths = resolve_paths(df, col, csv_path, check_exists=False)
        if roi and cfg.roi_label is not None and mcol is None:
            raise UserError(f"{csv_path}: has no 'Mask' column; --roi_label centres each box on a label of the row's "
                            f"Mask.")
        mask_paths = resolve_paths(df, mcol, csv_path, check_exists=False) if mcol else [""] * len(paths)
        if roi:  # the centre of each row's box: its Mask (roi_label) or its point
            centres = mask_paths if cfg.roi_label is not None else roi_points(df, csv_path, check=False)
            mask_paths = mask_paths if cfg.roi_label is not None else [""] * len(paths)
        else:
            centres = [None] * len(paths)
        for line, p, m, c in zip(df.index, paths, mask_paths, centres):
            if (p, m, c) not in seen:
                seen.add((p, m, c))
                rows.append(Row(p, m, f"{csv_path} {where(int(line))}", c))
    return rows


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


def fill_row(row: Row, cfg: PreprocessConfig, cache: VolumeCache) -> dict:
    """Cache one row: {'status': 'done' | 'cached' | 'failed', 'bytes', 'seconds', and 'error', 'part' on failure}.

    When only the label map fails, the image is still cached (pretraining needs it) and the row fails with the
    mask's error. Never raises for a bad row.
    """
    t0 = time.perf_counter()
    if not row.path:
        return {"status": "failed", "part": "image", "error": f"{row.where}: has an empty 'Path' value; expected "
                                                              f"a file path."}
    keys = cache_keys(row.path, cfg, row.mask or None, row.roi)
    missing = [k for k in keys if cache.get(k, decoded=False) is None]
    if not missing:
        return {"status": "cached"}
    try:
        if row.mask and not os.path.exists(row.mask):
            raise VolumeError(f"{row.mask}: file not found.")
        load_cached(row.path, cfg, cache, row.mask or None, decoded=False, roi=row.roi)
        return {"status": "done", "bytes": _entry_bytes(cache, missing), "seconds": time.perf_counter() - t0}
    except ROW_ERRORS as e:
        error = _reason(e, row)
    if cfg.roi:  # one box per row: name the row (its point is in the sentence)
        return {"status": "failed", "part": "image", "error": f"{row.where}: {error}"}
    if not row.mask or not error.startswith(row.mask + ":"):
        return {"status": "failed", "part": "image", "error": error}
    try:  # the label map failed: cache the image alone
        load_cached(row.path, cfg, cache, None, decoded=False)
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


def _init_worker(cache_dir: str, cfg: PreprocessConfig, rows: list[Row], busy, parent: int) -> None:
    """Pool initializer: one thread, ignore Ctrl-C (the parent stops the pool), exit with the parent, claim a slot
    of `busy` ([pid, row] pairs through which the parent learns which row a killed worker was on)."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    slot = -1
    with busy.get_lock():
        for s in range(len(busy) // 2):
            if busy[2 * s] == 0 or (busy[2 * s + 1] < 0 and not _alive(busy[2 * s])):
                busy[2 * s], busy[2 * s + 1], slot = os.getpid(), -1, s
                break
    _WORKER.update(cache=VolumeCache(cache_dir), cfg=cfg, rows=rows, busy=busy, slot=slot)


def _fill_task(i: int) -> dict:
    """Worker side of one row: `fill_row` with the row index recorded in this worker's slot meanwhile."""
    w, s = _WORKER, _WORKER["slot"]
    if s >= 0:
        w["busy"][2 * s + 1] = i
    try:
        fault_point(f"cache:worker:{i}")
        return {**fill_row(w["rows"][i], w["cfg"], w["cache"]), "i": i}
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


def fill_share(rows: list[Row], share: Sequence[int], cfg: PreprocessConfig, cache_dir: str, workers: int,
               bar=None) -> Summary:
    """Cache rows `share` of `rows` with a pool of `workers` processes; returns this process's Summary."""
    out, t0 = Summary(), time.perf_counter()
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    busy = ctx.Array("q", [0, -1] * (2 * workers))
    slots, stop = threading.Semaphore(2 * workers), threading.Event()
    with ctx.Pool(workers, _init_worker, (cache_dir, cfg, rows, busy, os.getpid())) as pool:
        results = pool.imap_unordered(_fill_task, _feed(share, slots, stop))
        pending = len(share)
        try:
            while pending:
                try:
                    recs = [results.next(timeout=1.0)]
                except mp.TimeoutError:
                    recs = []
                recs += [{"i": i, "status": "failed", "part": "image", "error": f"{rows[i].path}: {WORKER_DIED}."}
                         for i in _dead_rows(busy)]
                for rec in recs:
                    out.add(rec)
                    slots.release()
                    pending -= 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(failed=len(out.failed), refresh=False)
        finally:
            stop.set()
    out.seconds = time.perf_counter() - t0
    return out


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
        out.work_seconds += p.work_seconds
        out.seconds = max(out.seconds, p.seconds)
        out.failed.update(p.failed)
    return out


def fill_cache(rows: list[Row], cfg: PreprocessConfig, cache_dir: str, workers: int, rank: int = 0,
               world_size: int = 1) -> Summary:
    """Cache this rank's rows (rank, rank + world_size, ...), then gather the totals of every rank (all ranks
    get the same merged Summary). A progress bar with volumes/s and ETA is shown on rank 0."""
    from tqdm import tqdm

    share = range(rank, len(rows), world_size)
    with tqdm(total=len(share), unit="vol", desc=f"cache (rank 0 of {world_size})" if world_size > 1 else "cache",
              disable=rank != 0, dynamic_ncols=True, smoothing=0.05) as bar:
        mine = fill_share(rows, share, cfg, os.path.abspath(cache_dir), workers, bar)
    _wait_for_all_ranks()
    return merge(all_gather_objects(mine))


def read_failures(path: str) -> list[dict]:
    """The rows of a failures.csv ([] when it does not exist)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not set(FAILURE_COLUMNS) <= set(reader.fieldnames or ()):
            raise UserError(f"{path}: is not a failures list written by main_cache.py (columns "
                             f"{reader.fieldnames}, expected {', '.join(FAILURE_COLUMNS)}); move it away.")
        return [{c: r.get(c) or "" for c in FAILURE_COLUMNS} for r in reader]


def update_failures(cache_dir: str, cfg_key: str, rows: list[Row], failed: dict[int, tuple[str, str]]) -> str:
    """Rewrite `<cache_dir>/failures.csv` atomically: rows of other keys and rows not attempted now are kept, the
    attempted rows of this key are replaced by this run's failures (a row that now succeeds disappears)."""
    path = os.path.join(os.path.abspath(cache_dir), FAILURES_NAME)
    attempted = {(r.path, r.mask) for r in rows}
    kept = [r for r in read_failures(path) if r["key"] != cfg_key or (r["Path"], r["Mask"]) not in attempted]
    new = [{"Path": rows[i].path, "Mask": rows[i].mask, "key": cfg_key, "error": err}
           for i, (err, _) in sorted(failed.items())]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, FAILURE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept + new)
    write_text(path, buf.getvalue())
    return path


def known_failures(cache_dir: str, cfg_key: str) -> set[str]:
    """Image paths listed in `<cache_dir>/failures.csv` as failed for settings `cfg_key` (rows where only the
    label map failed are not included: their image is cached)."""
    return {r["Path"] for r in read_failures(os.path.join(os.fspath(cache_dir), FAILURES_NAME))
            if r["key"] == cfg_key and r["Path"] and not (r["Mask"] and r["error"].startswith(r["Mask"] + ":"))}


def drop_known_failures(table: pd.DataFrame, data_path: str, cache_dir: str, cfg_key: str) -> pd.DataFrame:
    """`table` without the rows whose Path main_cache.py listed as failed for `cfg_key`; prints one line when
    any were dropped. Raises UserError when every row is listed."""
    failed = known_failures(cache_dir, cfg_key)
    bad = table["Path"].isin(failed).to_numpy() if failed else None
    if bad is None or not bad.any():
        return table
    listed = os.path.join(os.path.abspath(cache_dir), FAILURES_NAME)
    if bad.all():
        raise UserError(f"{data_path}: every row is listed as failed in {listed}; fix or replace those volumes.")
    print(f"Skipping {int(bad.sum())} of {len(table)} volumes of {data_path} that main_cache.py could not "
          f"preprocess (listed with their reasons in {listed}).")
    return table[~bad]
