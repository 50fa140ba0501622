"""main_cache.py over the real CTs: 1 worker, 2 workers and 2 torchrun ranks write the same bytes; failures.csv
names exactly the broken rows; reruns, kills and killed workers; training then reads nothing but the cache."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import util.volume.preprocess
from bad_inputs import build_bad_files
from datasets_three_d import Custom3DDataset
from helpers import run_in_process, run_script
from util.volume.cache import QMAX, VolumeCache, encode
from util.data.cache_fill import known_failures
from util.volume.preprocess import PreprocessConfig, cache_keys, load_volume

SIZE = 32
CFG = PreprocessConfig(size=(SIZE,) * 3)  # main_cache.py's defaults at --input_size 32
SUMMARY = re.compile(r"(\d+) done \(newly cached\), (\d+) already cached, (\d+) failed, [\d.]+ GiB \(([\d,]+) bytes\) written")
REASONS = {"missing": "file not found", "truncated": "is truncated", "not_an_image": "not a readable image",
           "2d": "2D image", "4d": "4D image", "nan": "NaN or infinite", "inf": "NaN or infinite",
           "one_slice": "at least 2 voxels", "absurd": "more than the"}


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory) -> dict:
    """all.csv: 4 real CTs (IRCAD with its liver mask, TotalSegmentator NIfTI x2 and DICOM), the TotalSegmentator
    small CT with a missing label map (its image must still be cached), and every broken file + a missing one."""
    root = tmp_path_factory.mktemp("corpus")
    bad = build_bad_files(root / "bad")
    ts, ircad = shared_data / "totalseg", shared_data / "ircadb01"
    good = [(ircad / "ct.nii.gz", ircad / "mask_liver.nii.gz"), (ts / "example_ct.nii.gz", ""),
            (ts / "example_ct_sm.nii.gz", ""), (ts / "example_ct_dicom", "")]
    bad_mask = (ts / "example_ct_sm.nii.gz", root / "no_such_mask.nii.gz")
    rows = good + [bad_mask] + [(p, "") for p in bad.values()]
    (root / "all.csv").write_text("Path,Mask\n" + "".join(f"{p},{m}\n" for p, m in rows))
    (root / "good.csv").write_text("Path\n" + "".join(f"{p}\n" for p, _ in good))
    existing = [p for p, _ in good] + [p for p in bad.values() if p.exists()]
    (root / "existing.csv").write_text("Path\n" + "".join(f"{p}\n" for p in existing))
    return {"root": root, "bad": bad, "good": good, "bad_mask": bad_mask, "n_rows": len(rows)}


def fill(corpus, cache: Path, *flags, here: bool = False, **kw):
    """main_cache.py on all.csv at 32^3: in this process (here=True), else as a subprocess (kw: torchrun, env)."""
    args = ["--csv", corpus["root"] / "all.csv", "--cache_dir", cache, "--input_size", SIZE, *flags]
    if here:
        return run_in_process("main_cache.py", *args)
    return run_script("main_cache.py", *args, **kw)


def counts(r) -> tuple[int, int, int, int]:
    """(done, already cached, failed, bytes written) from the summary line."""
    found = SUMMARY.findall(r.stdout)
    assert len(found) == 1, r.stdout + r.stderr[-3000:]
    return tuple(int(v.replace(",", "")) for v in found[0])


def entries(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*.vol"))}


def stored(cache: Path, key) -> np.ndarray:
    """The stored form of an entry (uint16 levels for images), read and checked as training reads it."""
    got = VolumeCache(cache).get(key)
    assert got is not None, key
    return got


def failures(cache: Path) -> list[dict]:
    with open(cache / "failures.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The clean 1-worker fill everything else is compared with."""
    cache = tmp_path_factory.mktemp("cache_1worker")
    r = run_script("main_cache.py", "--csv", corpus["root"] / "all.csv", "--cache_dir", cache, "--input_size", SIZE,
                   "--workers", 1)
    return {"run": r, "cache": cache, "entries": entries(cache), "failures": failures(cache)}


def test_one_worker_fill_caches_the_good_rows_and_lists_the_bad(corpus, reference):
    r, cache = reference["run"], reference["cache"]
    assert r.returncode == 2, r.stderr[-3000:]
    n_bad = len(corpus["bad"]) + 1  # + the missing label map
    done, cached, failed, written = counts(r)
    assert (done, cached, failed) == (len(corpus["good"]), 0, n_bad)
    assert written == sum(len(b) for b in reference["entries"].values())
    assert f"{n_bad} of {corpus['n_rows']} rows failed" in r.stderr
    listed = {row["Path"]: row for row in reference["failures"] if not row["Mask"]}
    assert set(listed) == {str(p) for p in corpus["bad"].values()}
    for name, p in corpus["bad"].items():  # one sentence, starting with the file, saying what is wrong
        error = listed[str(p)]["error"]
        assert error.startswith(f"{p}: ") and REASONS[name] in error and error.count(". ") == 0, error
        assert listed[str(p)]["key"] == CFG.key()
    sm, mask = corpus["bad_mask"]
    (mask_row,) = [row for row in reference["failures"] if row["Mask"]]
    assert mask_row["Path"] == str(sm) and mask_row["error"] == f"{mask}: file not found."
    assert known_failures(cache, CFG.key()) == {str(p) for p in corpus["bad"].values()}  # sm's image is fine
    assert known_failures(cache, "another-key") == set()
    assert len(reference["entries"]) == len(corpus["good"]) + 1  # 4 images + the liver mask
    store = VolumeCache(cache)
    img = stored(cache, cache_keys(str(sm), CFG)[0])  # real values: the stored volume is the preprocessing's
    hu_cfg = CFG.with_overrides(window=store.settings.hu_range())  # entries hold HU; the window is applied when read
    assert img.dtype == np.uint16 and np.array_equal(img, encode(load_volume(str(sm), hu_cfg), QMAX))
    ircad, liver = corpus["good"][0]
    pair = [stored(cache, k) for k in cache_keys(str(ircad), CFG, str(liver))]
    assert pair[0].shape == pair[1].shape == (SIZE,) * 3 and set(np.unique(pair[1])) == {0, 1}


def test_two_workers_and_two_torchrun_ranks_write_the_same_cache(corpus, reference, tmp_path):
    r = fill(corpus, tmp_path / "two", "--workers", 2, here=True)
    assert r.returncode == 2 and counts(r)[:3] == counts(reference["run"])[:3], r.stderr[-3000:]
    t = fill(corpus, tmp_path / "ranks", torchrun=2)
    assert t.returncode == 0 and "2 processes x 1 workers" in t.stdout, t.stderr[-3000:]  # complete: no crash
    assert json.loads((tmp_path / "ranks" / "exit_status.json").read_text())["status"] == 2  # for job scripts
    assert counts(t)[:3] == counts(reference["run"])[:3]
    for cache in (tmp_path / "two", tmp_path / "ranks"):
        assert entries(cache) == reference["entries"]  # same entry files, byte for byte
        assert failures(cache) == reference["failures"]


def test_rerun_reports_everything_cached_and_writes_nothing(corpus, reference, tmp_path):
    cache = tmp_path / "copy"
    shutil.copytree(reference["cache"], cache)
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.vol")}
    r = fill(corpus, cache, "--workers", 2, here=True)
    assert r.returncode == 2 and counts(r) == (0, len(corpus["good"]), len(corpus["bad"]) + 1, 0), r.stdout
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.vol")} == stamps
    assert entries(cache) == reference["entries"] and failures(cache) == reference["failures"]


def test_killed_fill_restarted_completes_the_same_cache(corpus, reference, tmp_path):
    cache = tmp_path / "killed"
    r = fill(corpus, cache, "--workers", 1, env={"MAE3D_FAULT": "cache:row:3"})
    assert r.returncode == -9, r.stderr[-3000:]
    partial = entries(cache)
    assert 0 < len(partial) < len(reference["entries"])
    assert all(reference["entries"][k] == v for k, v in partial.items())  # what is there is complete
    stale = cache / "00" / ".tmp-abc123-dead.vol"  # what a writer killed mid-file leaves
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"MAE3DVC\x02 half")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    r = fill(corpus, cache, "--workers", 2, here=True)
    assert r.returncode == 2 and counts(r)[1] >= 1 and re.search(r"Removed \d+ temporary files", r.stdout), r.stdout
    assert entries(cache) == reference["entries"] and failures(cache) == reference["failures"]
    assert not list(cache.rglob(".tmp-*"))


def test_killed_worker_fails_only_its_row_and_a_rerun_clears_it(corpus, tmp_path, monkeypatch):
    ts = [str(p) for p, _ in corpus["good"][1:3]]
    (tmp_path / "ts.csv").write_text("Path\n" + "\n".join(ts) + "\n")
    cache, args = tmp_path / "c", ["--csv", tmp_path / "ts.csv", "--cache_dir", tmp_path / "c", "--input_size", SIZE]
    monkeypatch.setenv("MAE3D_FAULT", "cache:worker:1")  # the worker preprocessing row 1 is SIGKILLed (OOM)
    r = run_in_process("main_cache.py", *args, "--workers", 2)
    assert r.returncode == 2 and counts(r)[:3] == (1, 0, 1), r.stdout + r.stderr
    (row,) = failures(cache)
    assert row["Path"] == ts[1] and "worker process preprocessing it was killed" in row["error"]
    with open(cache / "failures.csv", "a") as f:  # a failure under other settings must survive the rewrite
        f.write(f"{ts[1]},,0123456789abcdef,{ts[1]}: failed under other settings.\n")
    monkeypatch.delenv("MAE3D_FAULT")
    r = run_in_process("main_cache.py", *args)
    assert r.returncode == 0 and counts(r)[:3] == (1, 1, 0), r.stdout + r.stderr
    assert [f["key"] for f in failures(cache)] == ["0123456789abcdef"]


def test_training_dataset_reads_only_the_cache_after_a_fill(corpus, reference, monkeypatch, capsys):
    reads, real = [], util.volume.preprocess.read_image
    monkeypatch.setattr(util.volume.preprocess, "read_image", lambda p: reads.append(p) or real(p))
    ds = Custom3DDataset(str(corpus["root"] / "good.csv"), input_size=SIZE, preprocess=CFG,
                         cache_dir=str(reference["cache"]), train=False)
    items = [ds[i][0] for i in range(len(ds))]
    assert len(items) == len(corpus["good"]) and reads == []
    assert all(x.shape == (1, SIZE, SIZE, SIZE) and x.dtype == torch.float32 and 0 <= x.min() < x.max() <= 1
               for x in items)
    capsys.readouterr()
    ds = Custom3DDataset(str(corpus["root"] / "existing.csv"), input_size=SIZE, preprocess=CFG,
                         cache_dir=str(reference["cache"]), train=False, skip_bad=True)
    n_listed = len(corpus["bad"]) - 1  # the missing file is not in existing.csv
    assert f"Skipping {n_listed} of {len(corpus['good']) + n_listed} volumes" in capsys.readouterr().out
    assert ds.paths == [str(p) for p, _ in corpus["good"]]
    assert all(ds[i][0].shape == (1, SIZE, SIZE, SIZE) for i in range(len(ds))) and reads == []


def test_checkpoint_preprocessing_is_used(corpus, tmp_path):
    sm = str(corpus["good"][2][0])
    (tmp_path / "sm.csv").write_text(f"Path\n{sm}\n")
    saved = PreprocessConfig(size=(16, 24, 24), window=(-1000.0, 400.0), interpolator="linear")
    torch.save({"model": {}, "preprocess": saved.to_dict()}, tmp_path / "ckpt.pth")
    r = run_in_process("main_cache.py", "--csv", tmp_path / "sm.csv", "--cache_dir", tmp_path / "c",
                       "--from_checkpoint", tmp_path / "ckpt.pth")
    assert r.returncode == 0 and saved.key() in r.stdout, r.stdout + r.stderr
    img = stored(tmp_path / "c", cache_keys(sm, saved)[0])
    hu_cfg = saved.with_overrides(window=VolumeCache(tmp_path / "c").settings.hu_range())
    assert img.shape == (16, 24, 24) and np.array_equal(img, encode(load_volume(sm, hu_cfg), QMAX))


@pytest.mark.parametrize("case", ["missing_csv", "no_path_column", "no_cache_dir", "no_preprocess_in_ckpt"])
def test_bad_input_ends_with_one_error_line(case, tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("Image,Label\na.nii.gz,1\n")
    args = ["--csv", tmp_path / "nope.csv" if case == "missing_csv" else table, "--cache_dir", tmp_path / "c"]
    named = {"missing_csv": tmp_path / "nope.csv", "no_path_column": table, "no_cache_dir": "--cache_dir",
             "no_preprocess_in_ckpt": tmp_path / "ckpt.pth"}[case]
    if case == "no_cache_dir":
        args = args[:2]
    if case == "no_preprocess_in_ckpt":
        torch.save({"model": {}}, tmp_path / "ckpt.pth")
        args += ["--from_checkpoint", tmp_path / "ckpt.pth"]
    r = run_in_process("main_cache.py", *args)
    # util/data/path_table.py's open(...).read() leaves a ResourceWarning, shown in-process only (hidden in a real run)
    lines = [s for s in r.stderr.splitlines() if s.strip() and not s.startswith("ResourceWarning")]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(named) in lines[0], lines
