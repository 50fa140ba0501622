"""A first day with your own data (issues 28 and 29): what a newcomer trips over when a run is rerun, refused,
resumed on an edited table, or predicted from inside another run's folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.bad_inputs import build_bad_files
from tests.helpers import load, run_in_process, save_tiny_mae, tiny_pretrain_args
from util.data.demo import make_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_day")
    return make_demo_data(str(root / "demo_data"), n_pretrain=8, n_labeled=8, seed=5)


def absolute(csv) -> pd.DataFrame:
    """The table with absolute paths (so it can be copied elsewhere)."""
    rows = pd.read_csv(csv)
    rows["Path"] = [str((Path(csv).parent / p).resolve()) for p in rows["Path"]]
    return rows


def pretrain(data, out, **kw):
    return run_in_process("main_pretrain.py", *tiny_pretrain_args(data, out, size=16, **kw))


def events(folder) -> list:
    return sorted(p.name for p in folder.glob("events.out.tfevents.*"))


def test_rerunning_a_finished_run_says_it_was_complete_and_writes_nothing(demo, tmp_path):
    out = tmp_path / "run"
    r = pretrain(demo["pretrain"], out, epochs=1)
    assert r.returncode == 0, r.stderr[-2000:]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = pretrain(demo["pretrain"], out, epochs=1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Already complete" in r.stdout and "Done in" not in r.stdout, r.stdout[-2000:]
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "exit_status.json"}
    assert after == {k: v for k, v in before.items() if k != "exit_status.json"}  # no new TensorBoard file either
    assert json.loads((out / "exit_status.json").read_text())["status"] == 0


def test_a_refused_init_leaves_no_output_folder(demo, tmp_path):
    small = save_tiny_mae(tmp_path / "ckpt" / "tiny_patch16.pth", size=32)  # patch 16: the run asks for 8
    out = tmp_path / "new" / "run"
    r = pretrain(demo["pretrain"], out, epochs=1, init=small, patch_size=8)
    assert r.returncode == 2 and "--patch_size 16 16 16" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "new").exists()


def test_a_training_table_edited_in_place_is_a_recipe_change(demo, tmp_path):
    table = tmp_path / "scans.csv"
    rows = absolute(demo["pretrain"])
    rows.iloc[:4].to_csv(table, index=False)
    out = tmp_path / "run"
    assert pretrain(table, out, epochs=1).returncode == 0
    rows.to_csv(table, index=False)  # 4 -> 8 rows, same file name
    r = pretrain(table, out, epochs=2)
    assert r.returncode == 2 and "table 4 rows sha256:" in r.stderr and "-> 8 rows sha256:" in r.stderr, r.stderr
    assert "--allow_recipe_change" in r.stderr
    r = pretrain(table, out, epochs=2, allow_recipe_change=True)
    assert r.returncode == 0 and "changed recipe" in r.stdout


def test_a_broken_held_out_file_stops_the_run_before_the_first_epoch(demo, tmp_path):
    bad = build_bad_files(tmp_path / "bad")["truncated"]
    val = tmp_path / "val.csv"
    pd.DataFrame({"Path": [absolute(demo["pretrain"])["Path"][0], str(bad)]}).to_csv(val, index=False)
    out = tmp_path / "run"
    r = pretrain(demo["pretrain"], out, epochs=1, val_path=val, vis_every=1)
    assert r.returncode == 2 and "truncated.nii.gz" in r.stderr, r.stderr[-2000:]
    assert "epoch 1/1 [" not in r.stdout and not (out / "checkpoint-last.pth").exists(), r.stdout[-2000:]


def test_prediction_never_touches_the_status_file_of_the_run_whose_folder_it_writes_into(demo, tmp_path):
    out = tmp_path / "run"
    assert pretrain(demo["pretrain"], out, epochs=1).returncode == 0
    stopped = {"status": 75, "meaning": "preempted; checkpoint written; rerun the same command to resume"}
    (out / "exit_status.json").write_text(json.dumps(stopped))  # as a run stopped by SIGTERM leaves it
    r = run_in_process("main_predict.py", "--input_csv", demo["predict"], "--embeddings", out / "emb.npy",
                       "--finetune", out / "checkpoint-last.pth", "--num_workers", 0, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "exit_status.json").read_text()) == stopped
    assert json.loads((out / "emb.npy.exit_status.json").read_text())["status"] == 0


def test_row_numbers_agree_between_the_failure_summary_and_the_rows_table(demo, tmp_path):
    out = tmp_path / "run"
    assert pretrain(demo["pretrain"], out, epochs=1).returncode == 0
    table = absolute(demo["predict"]).iloc[:2].copy()
    table.loc[1, "Path"] = str(tmp_path / "missing.nii.gz")
    table.to_csv(tmp_path / "in.csv", index=False)
    r = run_in_process("main_predict.py", "--input_csv", tmp_path / "in.csv", "--embeddings", tmp_path / "e.npy",
                       "--finetune", out / "checkpoint-last.pth", "--num_workers", 0, "--device", "cpu")
    assert r.returncode == 2
    assert "first: row 2:" in r.stderr, r.stderr[-2000:]   # the second data row under the header
    rows = pd.read_csv(tmp_path / "e.npy.rows.csv")
    assert list(rows["row"]) == [1, 2] and rows.loc[rows["row"] == 2, "error"].str.contains("missing").all()
    assert np.isnan(np.load(tmp_path / "e.npy")[1]).all()


def test_preprocessing_flags_for_a_checkpoint_without_stored_preprocessing_are_not_an_override(demo, tmp_path):
    ckpt = save_tiny_mae(tmp_path / "tangerine_like.pth", size=32)
    r = run_in_process("main_predict.py", "--input_csv", demo["predict"], "--embeddings", tmp_path / "e.npy",
                       "--finetune", ckpt, "--window", -1000, 400, "--num_workers", 0, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no longer sees exactly what training saw" not in r.stdout
    assert "stores no preprocessing" in r.stdout and "--window" in r.stdout


def test_finetuning_adopts_the_input_size_and_preprocessing_of_the_pretrained_encoder(demo, tmp_path):
    mae = tmp_path / "mae"
    r = run_in_process("main_pretrain.py", *tiny_pretrain_args(demo["pretrain"], mae, size=16, epochs=1), "--window",
                       -1000, 400)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "ft"
    common = ["--train_csv", demo["train"], "--val_csv", demo["val"], "--finetune", mae / "checkpoint-last.pth",
              "--epochs", 1, "--batch_size", 2, "--num_workers", 0, "--device", "cpu", "--output_dir"]
    r = run_in_process("main_finetune.py", *common, out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--input_size 16 16 16, --window -1000.0 400.0 (type the flag to choose another)" in r.stdout, r.stdout
    saved = load(out / "checkpoint-last.pth")
    assert saved["preprocess"]["size"] == [16, 16, 16] and saved["preprocess"]["window"] == [-1000.0, 400.0]
    r = run_in_process("main_finetune.py", *common, tmp_path / "typed", "--input_size", 32, "--window", -1200, 800)
    assert r.returncode == 0 and "--input_size 16" not in r.stdout and "--window -1000" not in r.stdout
    assert load(tmp_path / "typed" / "checkpoint-last.pth")["preprocess"]["size"] == [32, 32, 32]


def test_a_run_that_cannot_fit_in_memory_is_refused_before_anything_is_read_or_written(demo, tmp_path, monkeypatch):
    """Your own CSV on a CPU machine: the TANGERINE recipe (ViT-L, 256^3, batch 8) needs far more than a laptop's
    8 GiB; it is refused in one sentence naming the flags, before a volume is read or cached."""
    import util.train.budget as budget

    monkeypatch.setattr(budget, "available_memory", lambda device: (8.0 * 2 ** 30, "available (MemAvailable)"))
    out, cache = tmp_path / "run", tmp_path / "cache"
    r = run_in_process("main_pretrain.py", "--data_path", demo["pretrain"], "--output_dir", out, "--cache_dir", cache,
                       "--device", "cpu", "--num_workers", 0)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "WARNING: no --model typed, so this is the TANGERINE recipe: mae_vit_large_patch16 at 256x256x256" \
        in r.stdout
    assert "Estimated cost of one step (mae_vit_large_patch16, 256x256x256 in 16x16x16 patches, batch 8, fp32)" \
        in r.stdout and "per step on this CPU" in r.stdout, r.stdout
    err = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "but only 8.0 GiB are available (MemAvailable)" in err[0], r.stderr
    for flag in ("--batch_size", "--input_size", "--model", "--grad_checkpointing", "--no_memory_check"):
        assert flag in err[0], err[0]
    assert not out.exists() and not cache.exists()
    # the same machine, a run that fits: it says its cost and trains; --no_memory_check starts one that does not
    monkeypatch.setattr(budget, "available_memory", lambda device: (0.01 * 2 ** 30, "available (MemAvailable)"))
    r = pretrain(demo["pretrain"], out, epochs=1)
    assert r.returncode == 2 and "--no_memory_check" in r.stderr
    r = pretrain(demo["pretrain"], out, epochs=1, no_memory_check=True)
    assert r.returncode == 0 and "Estimated cost of one step (mae_vit_tiny_patch16, 16x16x16" in r.stdout
    r = run_in_process("main_finetune.py", "--train_csv", demo["train"], "--finetune", out / "checkpoint-last.pth",
                       "--epochs", 1, "--batch_size", 2, "--num_workers", 0, "--device", "cpu", "--output_dir",
                       tmp_path / "ft")
    assert r.returncode == 2 and "Estimated cost of one step (vit_tiny_patch16" in r.stdout, r.stdout[-2000:]
    assert "--no_memory_check" in r.stderr and not (tmp_path / "ft").exists()


def test_the_memory_available_is_read_from_this_machine():
    from util.train.budget import available_memory

    avail, where = available_memory("cpu")
    assert 0 < avail < float("inf") and where.startswith("available") or where == "left under the cgroup limit"


def test_save_inputs_writes_what_the_model_was_fed_on_its_geometry_named_by_row(demo, tmp_path):
    import SimpleITK as sitk
    from PIL import Image

    from util.volume.preprocess import PreprocessConfig, preprocess_image, read_image

    ckpt = save_tiny_mae(tmp_path / "mae.pth", size=32)
    table = absolute(demo["predict"]).iloc[:2]
    scan = table["Path"][0]
    img = read_image(scan)
    centre = img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 + 3 for n in img.GetSize()])
    points = table.assign(coordX=centre[0], coordY=centre[1], coordZ=centre[2])
    points.to_csv(tmp_path / "points.csv", index=False)
    common = ["--finetune", ckpt, "--num_workers", 0, "--device", "cpu"]
    r = run_in_process("main_predict.py", "--input_csv", tmp_path / "points.csv", "--embeddings", tmp_path / "w.npy",
                       "--save_inputs", tmp_path / "whole", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    stem = Path(scan).name.removesuffix(".nii.gz")
    fed = sitk.ReadImage(str(tmp_path / "whole" / f"row0001_{stem}.nii.gz"))
    arr, ref = preprocess_image(img, PreprocessConfig(size=(32, 32, 32)))
    assert np.array_equal(sitk.GetArrayFromImage(fed), arr)             # the very numbers the model saw
    assert np.allclose(fed.GetOrigin(), ref.GetOrigin(), atol=1e-6) and np.allclose(fed.GetSpacing(), ref.GetSpacing())
    assert np.allclose(fed.GetDirection(), ref.GetDirection())          # it overlays the scan in a viewer
    png = Image.open(next((tmp_path / "whole").glob("row0002_*.png")))
    assert png.size[0] > 3 * 150 and np.asarray(png).std() > 10        # three slices, not a blank picture
    # lesion-level rows: the box sits on the point (its physical centre is the point)
    r = run_in_process("main_predict.py", "--input_csv", tmp_path / "points.csv", "--embeddings", tmp_path / "b.npy",
                       "--roi_mm", 40, 40, 40, "--save_inputs", tmp_path / "boxes", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    box = sitk.ReadImage(str(tmp_path / "boxes" / f"row0001_{stem}.nii.gz"))
    mid = box.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in box.GetSize()])
    assert np.allclose(mid, centre, atol=1e-6) and np.allclose(box.GetSpacing(), 40 / 32)
    assert len(list((tmp_path / "boxes").glob("row0002_*.png"))) == 1


def test_finetuning_prints_one_line_per_epoch_when_an_epoch_is_one_step(demo, tmp_path):
    import re

    mae = tmp_path / "mae"
    assert pretrain(demo["pretrain"], mae, epochs=1).returncode == 0
    n_train = len(pd.read_csv(demo["train"]))
    r = run_in_process("main_finetune.py", "--train_csv", demo["train"], "--val_csv", demo["val"], "--finetune",
                       mae / "checkpoint-last.pth", "--linprobe", "--epochs", 3, "--batch_size", n_train,
                       "--num_workers", 0, "--device", "cpu", "--output_dir", tmp_path / "ft", "--print_freq", 5)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [x for x in r.stdout.splitlines() if re.match(r"epoch \d+/3", x)]
    assert [x.split(":")[0] for x in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"], lines
    assert all("train loss" in x and "val loss" in x for x in lines)


def test_main_cache_save_inputs_writes_each_rows_cached_input_named_by_table_and_row(demo, tmp_path):
    """main_cache.py --save_inputs: what training will read from the cache, row by row, on its geometry."""
    import SimpleITK as sitk
    from PIL import Image

    from util.volume.cache import VolumeCache
    from util.volume.preprocess import PreprocessConfig, load_cached, read_image

    table = absolute(demo["predict"]).iloc[:2]
    scan = table["Path"][0]
    img = read_image(scan)
    centre = img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 + 3 for n in img.GetSize()])
    table.assign(coordX=centre[0], coordY=centre[1], coordZ=centre[2]).to_csv(tmp_path / "points.csv", index=False)
    table.to_csv(tmp_path / "scans.csv", index=False)
    stem = Path(scan).name.removesuffix(".nii.gz")
    r = run_in_process("main_cache.py", "--csv", tmp_path / "scans.csv", "--cache_dir", tmp_path / "c",
                       "--input_size", 32, "--workers", 1, "--save_inputs", tmp_path / "seen")
    assert r.returncode == 0, r.stderr[-2000:]
    fed = sitk.ReadImage(str(tmp_path / "seen" / "scans" / f"row0001_{stem}.nii.gz"))
    cfg = PreprocessConfig(size=(32, 32, 32))
    cached, _ = load_cached(scan, cfg, VolumeCache(tmp_path / "c"))
    assert np.array_equal(sitk.GetArrayFromImage(fed), cached)  # what a training run reads from this cache
    png = Image.open(tmp_path / "seen" / "scans" / f"row0001_{stem}.png")
    assert png.size[0] > 3 * 150 and np.asarray(png).std() > 10
    assert len(list((tmp_path / "seen" / "scans").glob("row0002_*.png"))) == 1
    r = run_in_process("main_cache.py", "--csv", tmp_path / "points.csv", "--cache_dir", tmp_path / "c",
                       "--input_size", 32, "--roi_mm", 40, 40, 40, "--workers", 1, "--save_inputs", tmp_path / "seen")
    assert r.returncode == 0, r.stderr[-2000:]
    box = sitk.ReadImage(str(tmp_path / "seen" / "points" / f"row0001_{stem}.nii.gz"))
    mid = box.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in box.GetSize()])
    assert np.allclose(mid, centre, atol=1e-6) and np.allclose(box.GetSpacing(), 40 / 32)


def test_the_step_estimate_leaves_the_runs_random_state_alone():
    """The estimate's timing probes (a transformer block, matrix products) run after the seed is set and before the
    model is built: they must not draw from the global generator, or the same seed would give another model than
    before the estimate existed (the demo's first loss moved from 0.1314 to 0.1342)."""
    import torch

    from util.train.budget import block_rate, matmul_rate

    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    block_rate(64, tokens=16, budget=0.001)
    matmul_rate(0.001)
    assert torch.equal(torch.rand(4), expected)
