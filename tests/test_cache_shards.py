"""main_cache.py --shard I/N and --report: N independent jobs (run at the same time, as a SLURM array runs them)
cover every row once with rows of one scan together, share failures.csv, and the last pass lists what is missing."""
from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import ROOT, run_in_process
from util.data.cache_rows import Row, shard_of, shard_rows

N = 3


def rows_with_repeats(n_scans: int = 40) -> list[Row]:
    """Rows of `n_scans` scans, some with several rows (lesions, several label maps)."""
    rows = []
    for s in range(n_scans):
        for m in range(1 + s % 3):
            rows.append(Row(f"/data/scan_{s:03d}.nii.gz", f"/data/mask_{s:03d}_{m}.nii.gz", f"row {len(rows)}"))
    return rows


def test_shards_cover_every_row_once_keep_a_scans_rows_together_and_need_no_coordination():
    rows = rows_with_repeats()
    for n in (1, 2, 3, 7, 64):
        parts = [shard_rows(rows, i, n) for i in range(1, n + 1)]
        assert sorted(r.where for p in parts for r in p) == sorted(r.where for r in rows)  # each row exactly once
        for p in parts:
            assert not {r.path for r in p} & {r.path for q in parts if q is not p for r in q}  # a scan in one shard
        shuffled = rows[:]
        random.Random(n).shuffle(shuffled)  # another order, or a table with rows added: the same shard per scan
        assert all(shard_of(r, n) == shard_of(Row(r.path, "", ""), n) for r in shuffled + rows_with_repeats(60))
    sizes = [len(shard_rows(rows_with_repeats(600), i, 4)) for i in range(1, 5)]
    assert min(sizes) > 0.7 * max(sizes)  # balanced enough for an array of jobs


def write_ct(path: Path, seed: int) -> None:
    hu = np.random.default_rng(seed).normal(-300, 300, (6, 8, 8)).astype(np.int16)
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(img, str(path))


@pytest.fixture()
def table(tmp_path) -> tuple[Path, list[Row]]:
    """9 scans (two with two label maps), one broken file; each shard of 3 gets some rows. A shard is a hash of the
    absolute path, so the scans go in the first subfolder of tmp_path whose paths give every shard a row (a fixed
    folder would leave one empty in about 1 of 20 runs)."""
    def paths(folder: Path) -> list[tuple[str, str]]:
        return [(str(folder / f"ct{s}.nii.gz"), str(folder / f"m{s}.nii.gz") if k else "")
                for s in range(9) for k in range(1 if s % 4 else 2)] + [(str(folder / "broken.nii.gz"), "")]

    folder = next(tmp_path / f"scans{salt}" for salt in range(100)
                  if all(shard_rows([Row(p, m, "") for p, m in paths(tmp_path / f"scans{salt}")], i, N)
                         for i in range(1, N + 1)))
    folder.mkdir()
    rows = paths(folder)
    for s in range(9):
        write_ct(folder / f"ct{s}.nii.gz", s)
        if not s % 4:
            m = sitk.GetImageFromArray(np.zeros((6, 8, 8), np.uint8))
            m.SetSpacing((1.0, 1.0, 2.0))
            sitk.WriteImage(m, str(folder / f"m{s}.nii.gz"))
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not a volume")
    (tmp_path / "t.csv").write_text("Path,Mask\n" + "".join(f"{p},{m}\n" for p, m in rows))
    as_rows = [Row(p, m, "") for p, m in rows]
    assert all(shard_rows(as_rows, i, N) for i in range(1, N + 1))
    return tmp_path / "t.csv", as_rows


def report(table_csv: Path, cache: Path):
    return run_in_process("main_cache.py", "--csv", table_csv, "--cache_dir", cache, "--input_size", 8, "--report")


def test_an_array_of_shards_fills_the_cache_and_the_last_pass_says_what_is_missing(table, tmp_path):
    table_csv, rows = table
    cache = tmp_path / "cache"
    broken_shard = shard_of(rows[-1], N)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MAE3D_FAULT", None)

    def job(i):  # what `sbatch --array=1-3` runs, one process per task, all at the same time
        return subprocess.Popen([sys.executable, str(ROOT / "main_cache.py"), "--csv", str(table_csv), "--cache_dir",
                                 str(cache), "--input_size", "8", "--workers", "1", "--shard", f"{i}/{N}"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = [i for i in range(1, N + 1) if i != broken_shard][0]
    others = [i for i in range(1, N + 1) if i != first]
    r = run_in_process("main_cache.py", "--csv", table_csv, "--cache_dir", cache, "--input_size", 8, "--shard",
                       f"{first}/{N}")
    mine = shard_rows(rows, first, N)
    assert r.returncode == 0 and f"(shard {first} of {N}: {len(mine)} of {len(rows)} rows)" in r.stdout, r.stderr
    status = json.loads((cache / "shards" / f"{first}-of-{N}" / "exit_status.json").read_text())
    assert status["status"] == 0 and not (cache / "exit_status.json").exists()

    r = report(table_csv, cache)  # two shards have not run: their rows are missing
    assert r.returncode == 2 and f"{len(mine)} of {len(rows)} rows cached, 0 failed, {len(rows) - len(mine)} " \
                                 f"missing" in r.stdout, r.stdout + r.stderr
    with open(cache / "missing.csv", newline="") as f:
        listed = list(csv.DictReader(f))
    assert sorted((m["Path"], m["Mask"]) for m in listed) == sorted(
        (x.path, x.mask) for x in rows if shard_of(x, N) != first)
    assert {m["state"] for m in listed} == {"missing"} and "not cached yet" in r.stderr

    procs = [job(i) for i in others]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = {i: p.returncode for i, p in zip(others, procs)}
    assert codes == {i: 2 if i == broken_shard else 0 for i in others}, outs
    assert json.loads((cache / "shards" / f"{broken_shard}-of-{N}" / "exit_status.json").read_text())["status"] == 2

    r = report(table_csv, cache)  # all shards ran: only the broken file is left, with its reason
    assert r.returncode == 2 and f"{len(rows) - 1} of {len(rows)} rows cached, 1 failed, 0 missing" in r.stdout
    with open(cache / "missing.csv", newline="") as f:
        (left,) = list(csv.DictReader(f))
    assert left["Path"] == rows[-1].path and left["state"] == "failed" and left["error"].startswith(rows[-1].path)
    with open(cache / "failures.csv", newline="") as f:
        assert [x["Path"] for x in csv.DictReader(f)] == [rows[-1].path]

    table_csv.write_text("".join(table_csv.read_text().splitlines(keepends=True)[:-1]))  # drop the broken row
    r = report(table_csv, cache)
    assert r.returncode == 0 and not (cache / "missing.csv").exists()
    assert f"{len(rows) - 1} of {len(rows) - 1} rows cached, 0 failed, 0 missing" in r.stdout
    assert json.loads((cache / "exit_status.json").read_text())["status"] == 0
