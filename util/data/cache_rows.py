"""The rows main_cache.py caches: reading the tables, the split into independent shards (--shard I/N), the list of
failed rows (`<cache_dir>/failures.csv`) and the last pass that reports what is still missing (--report).

Shards: rows are grouped by their image (every row of one scan, e.g. its lesion boxes, lands in one shard: the scan
is read once), and group g goes to shard 1 + int(sha1(image path)[:15], 16) % N. The split needs no coordination and
does not depend on the order of the rows, the number of rows or which other shards ran: N jobs given the same
tables and N cover every row exactly once.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import os
from typing import NamedTuple, Sequence

import pandas as pd

from util.atomic import write_text
from util.data.path_table import find_column, read_csv_table, resolve_paths, roi_points, where
from util.errors import UserError
from util.volume.cache import VolumeCache
from util.data.channel_table import row_sources
from util.volume.channels import row_keys
from util.volume.preprocess import PreprocessConfig

FAILURES_NAME = "failures.csv"
FAILURE_COLUMNS = ("Path", "Mask", "key", "error")
MISSING_NAME = "missing.csv"
MISSING_COLUMNS = ("Path", "Mask", "where", "state", "error")


class Row(NamedTuple):
    """One volume to cache: absolute image path ("" when the cell was empty), label-map path or "", and where."""

    path: str
    mask: str
    where: str
    roi: object = None  # ROI settings: the row's point (x, y, z) or its Mask path (the box's centre)
    line: int = 0  # the row in its table, counted from 1 under the header (as every message counts)
    table: str = ""  # the table's file
    sources: tuple | None = None  # several channels: the row's ChannelSource tuple (`path` is the first's file)

    @property
    def input(self):
        """What util.volume.channels.load_row / row_keys take: the Path, or the channel sources."""
        return self.path if self.sources is None else self.sources


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
        plain = cfg is None or cfg.plain
        if col is None and plain:
            raise UserError(f"{csv_path}: has no 'Path' column (columns: {', '.join(map(str, df.columns))}); "
                             f"expected a header row with Path (and optionally Mask).")
        if len(df) == 0:
            raise UserError(f"{csv_path}: has no data rows; expected one row per volume.")
        if plain:
            paths, sources = resolve_paths(df, col, csv_path, check_exists=False), [None] * len(df)
        else:  # several channels: their columns, or the 4D files of Path (util.data.channel_table)
            paths, sources = row_sources(df, cfg, csv_path, check_exists=False)
        if roi and cfg.roi_label is not None and mcol is None:
            raise UserError(f"{csv_path}: has no 'Mask' column; --roi_label centres each box on a label of the row's "
                            f"Mask.")
        mask_paths = resolve_paths(df, mcol, csv_path, check_exists=False) if mcol else [""] * len(paths)
        if roi:  # the centre of each row's box: its Mask (roi_label) or its point
            centres = mask_paths if cfg.roi_label is not None else roi_points(df, csv_path, check=False)
            mask_paths = mask_paths if cfg.roi_label is not None else [""] * len(paths)
        else:
            centres = [None] * len(paths)
        for line, p, m, c, src in zip(df.index, paths, mask_paths, centres, sources):
            if (p, m, c, src) not in seen:
                seen.add((p, m, c, src))
                rows.append(Row(p, m, f"{csv_path} {where(int(line))}", c, int(line) - 1, csv_path, src))
    return rows

def shard_of(row: Row, n: int) -> int:
    """The shard (1..n) of a row: a hash of its image path, so every row of one scan lands in the same shard."""
    return 1 + int(hashlib.sha1(row.path.encode()).hexdigest()[:15], 16) % n


def shard_rows(rows: list[Row], i: int, n: int) -> list[Row]:
    """The rows of shard i of n, in table order."""
    return [r for r in rows if shard_of(r, n) == i]


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


def update_failures(cache_dir: str, cfg_key: str, rows: list[Row], failed: dict[int, tuple[str, str]],
                    attempted: Sequence[int] | None = None) -> str:
    """Rewrite `<cache_dir>/failures.csv` atomically, under an exclusive lock (`failures.csv.lock`, so independent
    shard jobs can finish at the same time): rows of other keys and rows not attempted now are kept, the attempted
    rows (`attempted`: indices into `rows`, default all) of this key are replaced by this run's failures (a row that
    now succeeds disappears)."""
    path = os.path.join(os.path.abspath(cache_dir), FAILURES_NAME)
    done = {(rows[i].path, rows[i].mask) for i in (range(len(rows)) if attempted is None else attempted)}
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kept = [r for r in read_failures(path) if r["key"] != cfg_key or (r["Path"], r["Mask"]) not in done]
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
    bad = table["Path"].isin(failed).to_numpy() if failed and "Path" in table.columns else None
    if bad is None or not bad.any():
        return table
    listed = os.path.join(os.path.abspath(cache_dir), FAILURES_NAME)
    if bad.all():
        raise UserError(f"{data_path}: every row is listed as failed in {listed}; fix or replace those volumes.")
    print(f"Skipping {int(bad.sum())} of {len(table)} volumes of {data_path} that main_cache.py could not "
          f"preprocess (listed with their reasons in {listed}).")
    return table[~bad]


def report_missing(rows: list[Row], cfg: PreprocessConfig, cache: VolumeCache) -> list[dict]:
    """The rows whose entries are not all in `cache` (files present; their checksums are verified when read), as
    {Path, Mask, where, state ('failed': listed in failures.csv with its error; 'missing': not cached yet, e.g. its
    shard has not run or was stopped), error}; also written to `<cache_dir>/missing.csv` (removed when none)."""
    failures = {(r["Path"], r["Mask"]): r["error"] for r in
                read_failures(os.path.join(cache.cache_dir, FAILURES_NAME)) if r["key"] == cfg.key()}
    out = []
    for row in rows:
        try:
            present = bool(row.path) and all(os.path.isfile(cache.path(k))
                                             for k in row_keys(row.input, cfg, row.mask or None, row.roi))
        except OSError:  # the source itself is gone: no key, no entry
            present = False
        if not present:
            error = failures.get((row.path, row.mask), "")
            out.append({"Path": row.path, "Mask": row.mask, "where": row.where,
                        "state": "failed" if error else "missing", "error": error})
    path = os.path.join(cache.cache_dir, MISSING_NAME)
    if out:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, MISSING_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(out)
        write_text(path, buf.getvalue())
    elif os.path.exists(path):
        os.remove(path)
    return out
