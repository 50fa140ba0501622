"""main_pretrain.py end to end: the demo run, torchrun on 2 CPU processes, gradient accumulation, non-finite loss."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import load, run_script, tiny_pretrain_args
from util.data.demo import make_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return make_demo_data(str(root / "demo_data"), n_pretrain=8, n_labeled=8, seed=1)


def test_demo_run_without_data_path_writes_checkpoint_logs_and_picture(tmp_path):
    r = run_script("main_pretrain.py", "--epochs", "2", "--input_size", "32", "--vis_every", "1", "--num_workers", "0",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "demo preset" in r.stdout
    out = tmp_path / "output_dir" / "demo_pretrain"
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 1 and isinstance(ckpt["args"], dict)
    assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in ckpt["args"].values())  # plain data
    assert "preprocess" not in ckpt["args"]  # the config lives in ckpt["preprocess"] as a dict, not as a repr string
    assert ckpt["args"]["model"] == "mae_vit_tiny_patch16" and ckpt["args"]["input_size"] == [32, 32, 32]
    assert ckpt["preprocess"]["window"] == [-1200.0, 800.0]
    weights = load(out / "mae_pretrained.pth")
    assert set(weights["model"]) == set(ckpt["model"])
    lines = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]  # counted from 1, like the console
    assert all(x["loss"] > 0 and x["unique_volumes"] == x["volumes"] for x in lines)
    assert sorted(p.name for p in out.glob("reconstruction-*.png")) == ["reconstruction-0001.png",
                                                                         "reconstruction-0002.png"]
    assert (out / "reconstruction-0002.png").stat().st_size > 1000
    assert list(out.glob("events.out.tfevents.*"))


def test_torchrun_two_cpu_ranks_split_data_and_write_once(demo, tmp_path):
    out = tmp_path / "run"
    r = run_script("main_pretrain.py", *tiny_pretrain_args(demo["pretrain"], out, epochs=2), torchrun=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert len(lines) == 2  # rank 0 alone writes the log
    # 8 volumes, 2 ranks x batch 2 x 2 steps: every volume seen once per epoch, none by both ranks
    assert all(x["volumes"] == 8 and x["unique_volumes"] == 8 for x in lines)
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-2.pth", "checkpoint-last.pth"]
    assert not list(out.glob(".*tmp*"))


def _fixed_noise_model():
    """Tiny MAE whose mask depends only on each sample's content, so batching does not change the masks."""
    import models_mae3d

    torch.manual_seed(0)
    model = models_mae3d.mae_vit_tiny_patch16(img_size=32, decoder_depth=1)
    plain_forward = model.forward

    def forward(imgs, mask_ratio=0.75, noise=None):
        noise = model.patchify(imgs).mean(-1) + torch.arange(model.num_patches) * 1e-6
        return plain_forward(imgs, mask_ratio, noise)

    model.forward = forward
    return model


@pytest.mark.parametrize("accum", [2])
def test_accumulation_matches_bigger_batch(accum):
    from engine_pretrain import MaskedReconstruction
    from util.train.loop import TrainParts, train_one_epoch
    from util.train.settings import Schedule, TrainSettings

    torch.manual_seed(1)
    vols = torch.rand(2, 1, 32, 32, 32)

    class DS(torch.utils.data.Dataset):
        paths = ["a", "b"]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return vols[i], i

    def step(batch, accum_iter):
        model = _fixed_noise_model()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        settings = TrainSettings(device="cpu", print_freq=100, batch_size=batch, accum_iter=accum_iter,
                                 schedule=Schedule(lr=1.0, epochs=1))
        loader = torch.utils.data.DataLoader(DS(), batch_size=batch, shuffle=False)
        parts = TrainParts(model, model, opt, torch.amp.GradScaler("cpu", enabled=False))
        train_one_epoch(parts, loader, 0, settings, MaskedReconstruction(DS.paths, "cpu", 0.75))
        return {k: before[k] - v for k, v in model.state_dict().items()}

    big, acc = step(2, 1), step(1, accum)
    moved = [k for k in big if big[k].abs().max() > 0]
    assert len(moved) > 10
    for k in moved:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-4, atol=1e-6)


def test_non_finite_loss_stops_with_batch_paths_and_keeps_checkpoint(demo, tmp_path):
    out = tmp_path / "run"
    ok = run_script("main_pretrain.py", *tiny_pretrain_args(demo["pretrain"], out, epochs=1))
    assert ok.returncode == 0, ok.stderr[-3000:]
    before = load(out / "checkpoint-last.pth")["model"]
    r = run_script("main_pretrain.py", *tiny_pretrain_args(demo["pretrain"], out, epochs=3, lr=1e38,
                                                                    allow_recipe_change=True))
    assert r.returncode != 0
    msg = r.stderr + r.stdout
    assert "Loss became" in msg and "batch files" in msg and ".nii.gz" in msg
    assert "Traceback" not in r.stderr
    after = load(out / "checkpoint-last.pth")["model"]
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_demo_preset_sends_every_output_to_the_typed_output_dir(tmp_path, monkeypatch, capsys):
    import functools

    import main_pretrain
    import util.data.demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(util.data.demo, "make_demo_data",
                        functools.partial(util.data.demo.make_demo_data, n_pretrain=4, n_labeled=8, seed=1))
    main_pretrain.cli_main(["--epochs", "1", "--input_size", "32", "--num_workers", "0", "--output_dir", "mine",
                            "--batch_size", "2", "--vis_every", "1"])
    out = capsys.readouterr().out
    assert "demo preset" in out and "tensorboard --logdir mine" in out
    assert list((tmp_path / "mine").glob("events.out.tfevents.*")) and (tmp_path / "mine" / "log.txt").exists()
    assert not (tmp_path / "output_dir").exists()  # nothing went to the preset's folder
