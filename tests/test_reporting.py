"""What runs tell the user: a steady ETA, epochs counted from 1 in every name, the final numbered checkpoint as a
hard link, the cache's hits said once, and finetuning's one line per epoch (and no best without validation)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re

import pytest

from tests.helpers import load, run_in_process, tiny_pretrain_args
from util.data.demo import make_demo_data
from util.logger import Pace, Progress


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(str(tmp_path_factory.mktemp("rep") / "demo_data"), n_pretrain=8, n_labeled=8, seed=3)


def _seconds(hms: str) -> int:
    h, m, s = (int(x) for x in hms.split(":"))
    return 3600 * h + 60 * m + s


def _simulated_run(epochs=4, steps=10, first=6.0, step=0.5, tail=2.0, print_freq=1):
    """Printed run ETAs of a run whose first step of every epoch waits `first` s for the loader, other steps take
    `step` s and the end of each epoch (evaluation, checkpoint) `tail` s: [(eta text, true seconds left)]."""
    now = [0.0]
    pace, out = Pace(), []
    total = epochs * (first + (steps - 1) * step + tail)
    for e in range(epochs):
        progress = Progress(steps, e, epochs, print_freq, 4, pace=pace, clock=lambda: now[0])
        for it in range(steps):
            now[0] += first if it == 0 else step
            if progress.due(it):
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    progress.show(it, loss=0.1)
                out.append((buf.getvalue(), total - now[0]))
        now[0] += tail
    return out


def test_run_eta_is_steady_across_epochs_despite_slow_first_steps():
    lines = _simulated_run()
    assert "eta measuring" in lines[0][0]  # one step says nothing about the rate
    etas = [(_seconds(re.search(r"run (\S+)", text).group(1)), true) for text, true in lines[1:]]
    second_epoch = 10 - 1  # from here on a whole epoch has been measured
    for eta, true in etas[second_epoch:]:
        assert abs(eta - true) <= 0.15 * true + 2.0 + 1, (eta, true)  # within the end-of-epoch work
    rises = [b[0] - a[0] for a, b in zip(etas, etas[1:])]
    assert max(rises) <= 2, rises  # it counts down; the first step of an epoch does not make it jump up


def test_epoch_time_leaves_out_the_first_epoch_and_a_resumed_partial_epoch():
    pace = Pace()
    pace.start_epoch(0, 0.0)
    pace.start_epoch(1, 100.0)     # first epoch: fills the cache
    pace.start_epoch(2, 110.0)
    pace.start_epoch(3, 122.0)
    assert pace.epoch_time() == pytest.approx(11.0)
    resumed = Pace()
    resumed.start_epoch(5, 0.0, first_step=40)  # resumed inside epoch 6: not a full epoch
    resumed.start_epoch(6, 3.0)
    assert resumed.epoch_time() is None


def test_file_names_and_log_count_epochs_from_one_and_the_last_numbered_checkpoint_is_a_link(demo, tmp_path):
    out = tmp_path / "run"
    args = tiny_pretrain_args(demo["pretrain"], out, epochs=2, save_every=1, vis_every=1)
    r = run_in_process("main_pretrain.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-1.pth", "checkpoint-2.pth",
                                                                     "checkpoint-last.pth"]
    assert sorted(p.name for p in out.glob("reconstruction-*.png")) == ["reconstruction-0001.png",
                                                                         "reconstruction-0002.png"]
    assert [json.loads(x)["epoch"] for x in (out / "log.txt").read_text().splitlines()] == [1, 2]
    assert "epoch 2/2" in r.stdout and "checkpoint-2.pth, a hard link" in r.stdout
    assert load(out / "checkpoint-1.pth")["epoch"] == 0  # written after the first epoch (stored 0-based)
    assert os.path.samefile(out / "checkpoint-2.pth", out / "checkpoint-last.pth")  # no second copy on disk
    r = run_in_process("main_pretrain.py", *tiny_pretrain_args(demo["pretrain"], out, epochs=3, save_every=1))
    assert r.returncode == 0 and "after epoch 2 of 3" in r.stdout, r.stderr[-3000:]
    assert load(out / "checkpoint-2.pth")["epoch"] == 1  # the link kept epoch 2 when checkpoint-last moved on
    assert load(out / "checkpoint-3.pth")["epoch"] == 2 and os.path.samefile(out / "checkpoint-3.pth",
                                                                               out / "checkpoint-last.pth")


def test_the_run_says_once_how_many_volumes_came_from_the_cache(demo, tmp_path):
    cache = tmp_path / "cache"
    lines = []
    for k, workers in enumerate((2, 0)):  # loader workers' reads count too
        args = tiny_pretrain_args(demo["pretrain"], tmp_path / f"run{k}", epochs=2, num_workers=workers,
                                  cache_dir=cache)
        r = run_in_process("main_pretrain.py", *args)
        assert r.returncode == 0, r.stderr[-3000:]
        lines.append([x for x in r.stdout.splitlines() if x.startswith("--cache_dir")])
    assert lines[0] == [f"--cache_dir {cache}: 0 of 8 training volumes came from the cache, 8 were preprocessed "
                        f"and stored there."]
    assert lines[1] == [f"--cache_dir {cache}: 8 of 8 training volumes came from the cache, 0 were preprocessed "
                        f"and stored there."]


def _finetune(demo, out, *extra):
    args = ["--train_csv", demo["train"], "--output_dir", out, "--model", "vit_tiny_patch16", "--input_size", 32,
            "--epochs", 2, "--warmup_epochs", 1, "--batch_size", 2, "--num_workers", 0, "--device", "cpu", *extra]
    r = run_in_process("main_finetune.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_finetuning_prints_loss_accuracy_and_auroc_each_epoch_on_one_line(demo, tmp_path):
    stdout = _finetune(demo, tmp_path / "ft", "--val_csv", demo["val"])
    lines = [x for x in stdout.splitlines() if re.match(r"epoch \d/2: ", x)]
    assert len(lines) == 2
    for line in lines:
        assert re.search(r"train loss [\d.]+; val loss [\d.]+, accuracy [\d.]+, balanced accuracy [\d.]+, "
                         r"f1 [\d.]+, auroc [\d.]+ \(best auroc [\d.]+ at epoch [12]\)", line), line
    logged = [json.loads(x) for x in (tmp_path / "ft" / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in logged] == [1, 2]
    assert f"val loss {logged[1]['val_loss']:.4f}, accuracy {logged[1]['val_accuracy']:.4f}" in lines[1]


def test_finetuning_without_validation_neither_writes_nor_announces_a_best_checkpoint(demo, tmp_path):
    stdout = _finetune(demo, tmp_path / "nv")
    assert not (tmp_path / "nv" / "checkpoint-best.pth").exists() and (tmp_path / "nv" / "checkpoint-last.pth").exists()
    assert "Wrote checkpoint-last.pth and log.txt" in stdout and "Wrote checkpoint-best" not in stdout
    assert "No --val_csv" in stdout and "no checkpoint-best.pth" in stdout
    assert re.search(r"epoch 2/2: train loss [\d.]+$", stdout, re.M)
