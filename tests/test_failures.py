"""Failure behaviour of the three scripts: every bad input ends in one sentence naming the file or row, with no
traceback, and nothing already written is damaged."""
from __future__ import annotations

import hashlib

import pandas as pd
import pytest
import torch

import models_mae3d
from tests.bad_inputs import build_bad_files, good_volume, write_csv
from tests.helpers import make_hostile_checkpoint, run_in_process, run_script, tiny_pretrain_args
from util.checkpoint import save_atomic


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    files = build_bad_files(root / "vols")
    goods = [good_volume(root / "vols" / f"good{i}.nii.gz", seed=i) for i in range(4)]
    return root, files, goods


@pytest.fixture()
def outdir(tmp_path):
    """An output folder that already holds a run's files; failures must leave them byte-identical."""
    out = tmp_path / "out"
    out.mkdir()
    save_atomic({"epoch": 3, "model": {"w": torch.ones(4)}}, out / "checkpoint-last.pth")
    (out / "log.txt").write_text('{"epoch": 3}\n')
    return out


def digest(folder) -> dict:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_one_sentence(r, *needles):
    assert r.returncode not in (0, -9), r.stdout[-1500:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    err = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1, r.stderr[-3000:]
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def pretrain(data, out, **kw):
    return run_in_process("main_pretrain.py", *tiny_pretrain_args(data, out, epochs=1, size=16, **kw))


def test_pretraining_bad_csvs_and_files(corpus, outdir):
    root, files, goods = corpus
    before = digest(outdir)
    empty = write_csv(root / "empty.csv", "", [])
    no_path = write_csv(root / "no_path.csv", "File,Label", [f"{goods[0]},1"])
    missing = write_csv(root / "missing.csv", "Path", [str(goods[0]), str(files["missing"])])
    truncated = write_csv(root / "trunc.csv", "Path", [str(goods[0]), str(files["truncated"])] + [str(g) for g in goods])
    assert_one_sentence(pretrain(empty, outdir), "empty.csv")
    assert_one_sentence(pretrain(no_path, outdir), "no_path.csv", "Path")
    assert_one_sentence(pretrain(missing, outdir), "does_not_exist.nii.gz", "3")
    assert_one_sentence(pretrain(truncated, outdir, batch_size=1), "checkpoint-last.pth", "does not fit")
    assert digest(outdir) == before
    r = pretrain(truncated, outdir.parent / "fresh", batch_size=1)
    assert_one_sentence(r, "truncated.nii.gz")
    assert "1 duplicated paths" in r.stderr


def test_pretraining_bad_flags(corpus, outdir, tmp_path):
    root, files, goods = corpus
    data = write_csv(root / "good.csv", "Path", [str(g) for g in goods])
    before = digest(outdir)
    r = run_script("main_pretrain.py", *tiny_pretrain_args(data, outdir, size=16), "--input_size", "24")
    assert_one_sentence(r, "--input_size", "multiple of --patch_size")
    blocked = tmp_path / "a_file"
    blocked.write_text("x")
    r = run_script("main_pretrain.py", *tiny_pretrain_args(data, blocked / "sub", epochs=1, size=16))
    assert_one_sentence(r, "a_file", "not a writable folder")
    assert digest(outdir) == before


def test_disk_full_while_checkpointing_stops_and_keeps_previous_checkpoint(corpus, tmp_path):
    import subprocess

    root, files, goods = corpus
    data = write_csv(root / "good.csv", "Path", [str(g) for g in goods])
    disk = tmp_path / "small_disk"
    disk.mkdir()
    # about 90 MB per tiny-MAE checkpoint (weights + AdamW state): the second write cannot fit
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk for real")
    try:
        r = run_script("main_pretrain.py", *tiny_pretrain_args(data, disk / "run", epochs=3, size=16))
        assert_one_sentence(r, "checkpoint-last.pth", "No space left on device", "intact")
        assert torch.load(disk / "run" / "checkpoint-last.pth", weights_only=True)["epoch"] == 0
        assert not list((disk / "run").glob(".*tmp*"))
    finally:
        subprocess.run(["umount", str(disk)])


def test_skip_bad_trains_past_broken_volumes_and_lists_them(corpus, tmp_path):
    root, files, goods = corpus
    bad = [files[k] for k in ("truncated", "not_an_image", "2d", "nan", "one_slice", "missing")]
    data = write_csv(root / "mixed.csv", "Path", [str(p) for p in [*goods, *bad]])
    out = tmp_path / "run"
    r = pretrain(data, out, skip_bad=True)
    assert r.returncode == 0, r.stderr[-3000:]
    log = pd.read_json(out / "log.txt", lines=True)
    skipped = log["skipped_files"].iloc[-1]
    assert sorted(map(str, bad)) == sorted(skipped)


def test_every_script_refuses_a_hostile_checkpoint(corpus, tmp_path):
    root, files, goods = corpus
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    make_hostile_checkpoint(evil, marker)
    data = write_csv(root / "good.csv", "Path", [str(g) for g in goods])
    ft = write_csv(root / "ft.csv", "Path,Label", [f"{g},{i % 2}" for i, g in enumerate(goods)])
    runs = [
        run_script("main_pretrain.py", *tiny_pretrain_args(data, tmp_path / "p", size=16), "--resume", evil),
        run_in_process("main_finetune.py", "--train_csv", ft, "--val_csv", ft, "--model", "vit_tiny_patch16",
                       "--input_size", 16, "--finetune", evil, "--output_dir", tmp_path / "f", "--device", "cpu",
                       "--num_workers", 0, "--batch_size", 2),
        run_in_process("main_predict.py", "--input_csv", ft, "--output_csv", tmp_path / "pred.csv", "--finetune", evil,
                       "--device", "cpu", "--num_workers", 0),
    ]
    for r in runs:
        assert_one_sentence(r, "evil.pth", "unsafe")
    assert not marker.exists()


def test_finetune_bad_labels_and_foreign_architecture(corpus, tmp_path):
    root, files, goods = corpus
    g = [str(p) for p in goods]
    base = ["--model", "vit_tiny_patch16", "--input_size", 16, "--device", "cpu", "--num_workers", 0, "--epochs", 1,
            "--batch_size", 2, "--output_dir", tmp_path / "f"]
    good = write_csv(root / "ft_good.csv", "Path,Label", [f"{p},{i % 2}" for i, p in enumerate(g)])
    cases = {
        "text label": (write_csv(root / "ft_text.csv", "Path,Label", [f"{g[0]},0", f"{g[1]},benign"]), ["row", "benign"]),
        "missing label": (write_csv(root / "ft_nan.csv", "Path,Label", [f"{g[0]},0", f"{g[1]},"]), ["row", "Label"]),
    }
    for name, (csv, needles) in cases.items():
        r = run_in_process("main_finetune.py", "--train_csv", csv, "--val_csv", good, *base)
        assert_one_sentence(r, csv.name, *needles)
    r = run_in_process("main_finetune.py", "--train_csv", good, "--val_csv", good, "--label_columns", "Malignant",
                       *base)
    assert_one_sentence(r, "Malignant")
    foreign = tmp_path / "base.pth"
    torch.save({"model": models_mae3d.mae_vit_small_patch16(img_size=16).state_dict()}, foreign)
    r = run_in_process("main_finetune.py", "--train_csv", good, "--val_csv", good, "--finetune", foreign, *base)
    assert_one_sentence(r, "cls_token", "384", "192")


def test_prediction_survives_every_bad_volume_and_keeps_existing_output(corpus, tmp_path):
    import models_vit3d
    from util.volume.preprocess import PreprocessConfig

    root, files, goods = corpus
    model = models_vit3d.vit_tiny_patch16(img_size=16, num_classes=1)
    meta = {"task": "classification", "mode": "binary", "model": "vit_tiny_patch16", "nb_classes": 2, "nb_outputs": 1,
            "label_names": ["Label"], "input_size": [16] * 3, "patch_size": [16] * 3, "global_pool": "avg"}
    ckpt = tmp_path / "clf.pth"
    save_atomic({"model": model.state_dict(), "meta": meta, "preprocess": PreprocessConfig(size=(16,) * 3).to_dict()},
                ckpt)
    rows = [*goods[:2], *files.values(), goods[2]]
    csv = write_csv(root / "predict.csv", "Path", [str(p) for p in rows])
    out = tmp_path / "pred.csv"
    r = run_script("main_predict.py", "--input_csv", csv, "--output_csv", out, "--finetune", ckpt, "--device", "cpu",
                   "--num_workers", 2, "--batch_size", 2)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    df = pd.read_csv(out, keep_default_na=False)
    assert list(df["Path"]) == [str(p) for p in rows]
    ok = df["error"] == ""
    assert list(ok) == [True, True] + [False] * len(files) + [True]
    for name, path in files.items():
        msg = df.loc[df["Path"] == str(path), "error"].item()
        assert path.name in msg and msg.count("\n") == 0, (name, msg)
    before = out.read_bytes()
    r = run_script("main_predict.py", "--input_csv", csv, "--output_csv", out, "--finetune", ckpt, "--device", "cpu")
    assert_one_sentence(r, "pred.csv", "--overwrite")
    assert out.read_bytes() == before
