"""The pretraining data manifest (util/data/manifest.py): content fingerprints, the manifest main_pretrain.py
writes and its checkpoint records, and main_evaluate.py's overlap check by path and by copied content."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import run_in_process, tiny_pretrain_args
from util.evaluate.pretraining import pretraining_scans
from util.data.manifest import (MANIFEST_NAME, find_overlap, fingerprint, pretraining_data, read_manifest,
                                write_manifest)
from util.data.demo import make_demo_data
from util.errors import UserError


def _scan(path, n: int, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(n))
    return str(path)


def test_fingerprint_follows_the_bytes_not_the_path(tmp_path):
    a = _scan(tmp_path / "a" / "ct.nii.gz", 500_000, 0)  # much larger than the three sampled blocks
    b = tmp_path / "b" / "copy.nii.gz"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    assert fingerprint(a)[2] == fingerprint(str(b))[2] and fingerprint(a)[0] == 500_000
    data = bytearray(b.read_bytes())
    data[len(data) // 2 - 100] ^= 0xFF  # one flipped byte inside the middle block (8 KiB around the centre)
    b.write_bytes(bytes(data))
    assert fingerprint(a)[2] != fingerprint(str(b))[2]
    series = tmp_path / "dicom" / "series1"
    for k in range(5):
        _scan(series / f"IM{k:03d}.dcm", 3000, k)
    shutil.copytree(series, tmp_path / "elsewhere" / "s")
    assert fingerprint(str(series))[2] == fingerprint(str(tmp_path / "elsewhere" / "s"))[2]
    (tmp_path / "elsewhere" / "s" / "IM004.dcm").unlink()  # a series missing a slice is another series
    assert fingerprint(str(series))[2] != fingerprint(str(tmp_path / "elsewhere" / "s"))[2]


def test_manifest_round_trip_and_damage_is_refused(tmp_path):
    paths = [_scan(tmp_path / "scans" / f"{i}.nii", 1000 + i, i) for i in range(4)] + [str(tmp_path / "gone.nii")]
    name, digest = write_manifest(paths, str(tmp_path))
    table = read_manifest(str(tmp_path / name), digest)
    assert name == MANIFEST_NAME and table["path"].tolist() == paths
    assert table["fingerprint"].iloc[-1] == "" and table["size"].iloc[-1] == -1  # unreadable: listed, no print
    assert table["fingerprint"].iloc[:4].str.len().eq(32).all()
    assert write_manifest(paths, str(tmp_path)) == (name, digest)  # a resumed run rewrites the very same bytes
    data = bytearray((tmp_path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256 differs from the one its checkpoint recorded"):
        read_manifest(str(tmp_path / name), digest)
    (tmp_path / name).write_bytes(bytes(data[: len(data) // 3]))  # cut short
    with pytest.raises(UserError, match="is not a readable data manifest"):
        read_manifest(str(tmp_path / name))


def test_overlap_by_path_and_by_copied_content(tmp_path):
    train = [_scan(tmp_path / "pre" / f"{i}.nii.gz", 4000, i) for i in range(3)]
    write_manifest(train, str(tmp_path))
    manifest = read_manifest(str(tmp_path / MANIFEST_NAME))
    copy = tmp_path / "test" / "renamed.nii.gz"
    copy.parent.mkdir()
    shutil.copyfile(train[2], copy)
    fresh = _scan(tmp_path / "test" / "new.nii.gz", 4000, 99)
    hits = find_overlap([fresh, train[0], str(copy)], manifest)
    assert hits[["row", "matched_by"]].values.tolist() == [[1, "path"], [2, "content"]]
    assert hits["pretraining_path"].tolist() == [train[0], train[2]]
    listed = tmp_path / "tangerine_scans.txt"  # a checkpoint made elsewhere: its list of paths
    listed.write_text("pre/0.nii.gz\npre/1.nii.gz\n")
    table, what = pretraining_data(str(listed))
    assert "by path only" in what
    assert find_overlap([fresh, train[1], str(copy)], table)[["row", "matched_by"]].values.tolist() == [[1, "path"]]


def test_pretraining_records_its_manifest_and_the_evaluation_finds_the_overlap(tmp_path):
    demo = make_demo_data(str(tmp_path / "demo"), n_pretrain=4, n_labeled=4, seed=3)
    out = tmp_path / "run"
    r = run_in_process("main_pretrain.py", *tiny_pretrain_args(demo["pretrain"], out, epochs=1, size=32))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    args = torch.load(out / "mae_pretrained.pth", weights_only=True)["args"]
    assert args["data_manifest"] == MANIFEST_NAME and len(args["data_manifest_sha256"]) == 64
    scans = pd.read_csv(demo["pretrain"])["Path"].map(lambda p: os.path.normpath(
        os.path.join(os.path.dirname(demo["pretrain"]), p))).tolist()
    manifest, _ = pretraining_scans(str(out / "mae_pretrained.pth"))
    assert manifest["path"].tolist() == scans
    # evaluated: one scan it pretrained on, one copied elsewhere, and the labelled (never pretrained) scans
    shutil.copyfile(scans[1], tmp_path / "copied.nii.gz")
    labelled = pd.read_csv(demo["train"])
    paths = [scans[0], str(tmp_path / "copied.nii.gz"), *[os.path.join(demo["root"], p) for p in labelled["Path"]]]
    table = pd.DataFrame({"Path": paths, "Label": np.arange(len(paths)) % 2})
    emb = np.random.default_rng(0).normal(size=(len(paths), 4)).astype(np.float32)
    np.save(tmp_path / "e.npy", emb)
    table.assign(row=range(len(paths)), error="").to_csv(tmp_path / "e.npy.rows.csv", index=False)
    table.to_csv(tmp_path / "labels.csv", index=False)
    r = run_in_process("main_evaluate.py", "--embeddings", f"mae={tmp_path / 'e.npy'}", "--labels",
                       tmp_path / "labels.csv", "--folds", 2, "--protocols", "knn", "--label_fractions", 1,
                       "--bootstrap", 0, "--pretraining", f"mae={out / 'mae_pretrained.pth'}",
                       "--output_dir", tmp_path / "eval")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"mae: 2 of {len(paths)} evaluated scans were in its pretraining data" in r.stdout
    hits = pd.read_csv(tmp_path / "eval" / "overlap.csv")
    assert sorted(zip(hits.path, hits.matched_by)) == sorted([(scans[0], "path"),
                                                              (str(tmp_path / "copied.nii.gz"), "content")])
    assert "2 of" in (tmp_path / "eval" / "summary.md").read_text()
    # the model folder main_export.py makes with --with_manifest is a pretraining source too (record read there)
    r = run_in_process("main_export.py", out / "mae_pretrained.pth", tmp_path / "folder", "--with_manifest")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    from_folder, what = pretraining_scans(str(tmp_path / "folder"))
    assert from_folder["path"].tolist() == scans and "of folder" in what
    os.remove(out / MANIFEST_NAME)  # the checkpoint alone, moved without its manifest
    with pytest.raises(UserError, match="which is not beside it"):
        pretraining_scans(str(out / "mae_pretrained.pth"))


def _evaluation_inputs(folder, table: pd.DataFrame, name: str = "e.npy") -> str:
    """An embedding file of `table`'s rows as main_predict.py writes it (the .npy and its .rows.csv)."""
    import engine_predict as predict_io

    emb = np.random.default_rng(0).normal(size=(len(table), 4)).astype(np.float32)
    path = str(folder / name)
    predict_io.write_embeddings(path, table, {i: {"emb": emb[i]} for i in range(len(table))}, 4)
    return path


def _evaluate(emb: str, out, *extra):
    return run_in_process("main_evaluate.py", "--embeddings", f"mae={emb}", "--folds", 2, "--protocols", "knn",
                          "--label_fractions", 1, "--bootstrap", 0, "--output_dir", out, *extra)


def test_overlap_resolves_a_row_tables_paths_against_the_table_they_came_from(tmp_path):
    """main_predict.py writes the paths as its --input_csv held them, relative to that CSV's folder; they used to
    be resolved against the embedding file's folder (3 of 17 found where 7 of 17 were pretrained on)."""
    data = tmp_path / "data"
    scans = [_scan(data / "ct" / f"{i}.nii.gz", 4000, i) for i in range(8)]
    write_manifest(scans[:4], str(tmp_path))  # pretrained on the first four
    table = pd.DataFrame({"Path": [f"ct/{i}.nii.gz" for i in range(8)], "Label": np.arange(8) % 2})
    table.to_csv(data / "scans.csv", index=False)
    (tmp_path / "emb").mkdir()
    emb = _evaluation_inputs(tmp_path / "emb", table)
    pre = f"mae={tmp_path / MANIFEST_NAME}"
    r = _evaluate(emb, tmp_path / "out", "--pretraining", pre)  # no --labels: the row table, paths relative
    assert r.returncode == 2 and "relative to the CSV main_predict.py read" in r.stderr and "--labels" in r.stderr
    r = _evaluate(emb, tmp_path / "out", "--pretraining", pre, "--labels", data / "scans.csv")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mae: 4 of 8 evaluated scans were in its pretraining data" in r.stdout
    assert sorted(pd.read_csv(tmp_path / "out" / "overlap.csv").path) == scans[:4]


def test_unreadable_scans_are_reported_not_skipped(tmp_path):
    train = [_scan(tmp_path / "pre" / f"{i}.nii.gz", 4000, i) for i in range(2)]
    write_manifest(train, str(tmp_path))
    manifest = read_manifest(str(tmp_path / MANIFEST_NAME))
    gone = str(tmp_path / "test" / "moved_away.nii.gz")
    fresh = _scan(tmp_path / "test" / "new.nii.gz", 4000, 99)
    hits = find_overlap([fresh, gone, train[1], ""], manifest)
    assert hits[["row", "matched_by"]].values.tolist() == [[1, "unreadable"], [2, "path"], [3, "unreadable"]]
    assert "No such file" in hits.pretraining_path[0] and hits.pretraining_path[2] == "empty path"


def test_overlap_rows_count_the_label_files_rows(tmp_path):
    """overlap.csv's `row` used to be the position in the evaluation's internal (sorted) order."""
    scans = [_scan(tmp_path / "s" / f"{name}.nii.gz", 4000, k) for k, name in enumerate("dcbaef")]
    write_manifest([scans[0], scans[3]], str(tmp_path))  # d (row 1 of the label file) and a (row 4)
    table = pd.DataFrame({"Path": scans, "Label": [0, 1, 0, 1, 0, 1]})
    table.to_csv(tmp_path / "labels.csv", index=False)
    emb = _evaluation_inputs(tmp_path, table)
    r = _evaluate(emb, tmp_path / "out", "--labels", tmp_path / "labels.csv", "--pretraining",
                  f"mae={tmp_path / MANIFEST_NAME}")
    assert r.returncode == 0, r.stderr[-2000:]
    hits = pd.read_csv(tmp_path / "out" / "overlap.csv")
    assert hits[["row", "path"]].values.tolist() == [[1, scans[0]], [4, scans[3]]]
