"""main_finetune.py end to end on the demo phantoms: every task type, loading, layer decay, --eval, the demo preset."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import engine_finetune
import main_finetune
import models_mae3d
from tests.helpers import load, save_tiny_mae
from util.nn.pos_embed import get_3d_sincos_pos_embed
from util.task.meta import RunMeta
from util.task.record import read_record


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """Demo phantoms plus CSVs with multiclass, multi-label and regression columns (same folder: relative paths)."""
    from util.data.demo import make_demo_data

    root = tmp_path_factory.mktemp("ft")
    paths = make_demo_data(str(root / "demo_data"), n_pretrain=4, n_labeled=20, seed=1)
    for split in ("train", "val"):
        df = pd.read_csv(paths[split])
        i = np.arange(len(df))
        df["Cls3"] = i % 3
        df["A"], df["B"] = i % 2, (i // 2) % 2
        df["Size"] = 0.5 * df["Label"] + 0.1 * i
        df.to_csv(Path(paths[split]).with_name(f"{split}_extra.csv"), index=False)
    return {**paths, "root": root, "cache": str(root / "cache"),
            "train_x": str(Path(paths["train"]).with_name("train_extra.csv")),
            "val_x": str(Path(paths["val"]).with_name("val_extra.csv"))}


@pytest.fixture(scope="module")
def mae64(demo) -> Path:
    return save_tiny_mae(demo["root"] / "mae64" / "mae_pretrained.pth")


def ft_args(demo, out, *extra, train=None, val=None, size=(32,), epochs=1) -> list[str]:
    """Flags for a seconds-long finetuning run of vit_tiny on the demo phantoms."""
    args = ["--train_csv", train or demo["train"], "--val_csv", val or demo["val"], "--output_dir", out,
            "--model", "vit_tiny_patch16", "--input_size", *size, "--epochs", epochs, "--warmup_epochs", 1,
            "--batch_size", 4, "--num_workers", 0, "--device", "cpu", "--print_freq", 1,
            "--cache_dir", demo["cache"], *extra]
    return [str(a) for a in args]


def log_lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]


def test_binary_from_mae_at_other_size_writes_self_contained_checkpoints_and_resumes(demo, mae64, tmp_path, capsys):
    out = tmp_path / "bin"
    main_finetune.cli_main(ft_args(demo, out, "--finetune", mae64, size=(32, 64, 64), epochs=1))
    assert "loaded" in capsys.readouterr().out
    main_finetune.cli_main(ft_args(demo, out, "--finetune", mae64, size=(32, 64, 64), epochs=2))
    assert "Resumed from" in capsys.readouterr().out
    lines = log_lines(out)
    assert [x["epoch"] for x in lines] == [1, 2]
    assert all(0 <= x["val_auroc"] <= 1 and x["train_loss"] > 0 and x["val_n"] == len(pd.read_csv(demo["val"]))
               for x in lines)
    ckpt = load(out / "checkpoint-last.pth")
    assert {"model", "optimizer", "epoch", "scaler", "args", "meta", "preprocess"} <= set(ckpt)
    meta = ckpt["meta"]
    assert meta["mode"] == "binary" and meta["nb_outputs"] == 1 and meta["input_size"] == [32, 64, 64]
    assert meta["model"] == "vit_tiny_patch16" and meta["global_pool"] == "avg" and meta["linprobe"] is False
    assert ckpt["preprocess"]["size"] == [32, 64, 64] and isinstance(ckpt["args"], dict)
    best = load(out / "checkpoint-best.pth")
    assert best["best"]["metric"] == "auroc" and best["metrics"]["auroc"] == max(x["val_auroc"] for x in lines)
    assert list(out.glob("events.out.tfevents.*"))
    from models_build import load_for_inference

    model, meta2, pre = load_for_inference(read_record(out / "checkpoint-last.pth"))
    assert meta2.to_dict() == meta and pre.to_dict() == ckpt["preprocess"]  # the typed record is what was stored
    assert model(torch.rand(2, 1, 32, 64, 64)).shape == (2, 1)


def test_eval_reproduces_recorded_metrics_with_resume_or_finetune_flag(demo, tmp_path):
    out = tmp_path / "run"
    main_finetune.cli_main(ft_args(demo, out, "--pool", "cat", epochs=1))
    recorded = load(out / "checkpoint-best.pth")["metrics"]
    for flag in ("--resume", "--finetune"):
        js = tmp_path / f"eval{flag}.json"
        main_finetune.cli_main(["--eval", flag, str(out / "checkpoint-best.pth"), "--val_csv", demo["val"],
                                "--metrics_json", str(js), "--num_workers", "0", "--device", "cpu",
                                "--cache_dir", demo["cache"]])
        got = json.loads(js.read_text())
        assert got["auroc"] == pytest.approx(recorded["auroc"], abs=1e-9)
        assert got["loss"] == pytest.approx(recorded["loss"], rel=1e-5)
        assert got["n"] == recorded["n"]


def test_multiclass_uses_class_weights_and_label_smoothing(demo, tmp_path):
    out = tmp_path / "mc"
    main_finetune.cli_main(ft_args(demo, out, "--label_columns", "Cls3", "--class_weights", "auto",
                                   train=demo["train_x"], val=demo["val_x"]))
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["meta"]["mode"] == "multiclass" and ckpt["meta"]["nb_outputs"] == 3
    assert ckpt["loss_weights"]["class_weight"].shape == (3,) and ckpt["args"]["smoothing"] == 0.1
    line = log_lines(out)[0]
    assert {"val_auroc", "val_accuracy", "val_balanced_accuracy", "val_f1", "val_auroc_2"} <= set(line)


def test_multilabel_has_one_logit_per_column_and_auto_pos_weight(demo, tmp_path):
    out = tmp_path / "ml"
    main_finetune.cli_main(ft_args(demo, out, "--label_columns", "A", "B", "--pos_weight", "auto",
                                   "--grad_checkpointing", train=demo["train_x"], val=demo["val_x"]))
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["meta"]["mode"] == "multilabel" and ckpt["meta"]["label_names"] == ["A", "B"]
    assert ckpt["model"]["head.weight"].shape == (2, 192)
    train = pd.read_csv(demo["train_x"])
    pos = train[["A", "B"]].sum().to_numpy()
    expect = (len(train) - pos) / pos
    np.testing.assert_allclose(ckpt["loss_weights"]["pos_weight"].numpy(), expect, rtol=1e-5)
    assert {"val_auroc_A", "val_auroc_B"} <= set(log_lines(out)[0])


def test_regression_reports_mae_and_keeps_lowest(demo, tmp_path):
    out = tmp_path / "reg"
    main_finetune.cli_main(ft_args(demo, out, "--regression", "--label_columns", "Size", "--accum_iter", 2,
                                   train=demo["train_x"], val=demo["val_x"], epochs=2))
    lines = log_lines(out)
    best = load(out / "checkpoint-best.pth")
    assert best["meta"]["mode"] == "regression" and best["best"]["metric"] == "mae"
    assert best["best"]["value"] == pytest.approx(min(x["val_mae"] for x in lines))


def test_segmentation_with_spacing_validates_whole_volumes_by_sliding_window(demo, tmp_path):
    out = tmp_path / "seg"
    args = ft_args(demo, out, "--task", "segmentation", "--spacing", 8, 8, 8, "--feature_size", 8)
    main_finetune.cli_main(args)
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["meta"]["mode"] == "segmentation" and ckpt["meta"]["nb_classes"] >= 2
    assert any(k.startswith("encoder.blocks.") for k in ckpt["model"])
    line = log_lines(out)[0]
    assert 0 <= line["val_dice"] <= 1 and "val_dice_1" in line
    # the eval set holds whole volumes, larger than the 32^3 training crops on some axis
    from dataclasses import replace

    from util.volume.preprocess import PreprocessConfig

    s = main_finetune.parse_args(args)
    s = replace(s, preprocess=PreprocessConfig.from_dict(load(out / "checkpoint-last.pth")["preprocess"]))
    ds = main_finetune.make_dataset(demo["val"], False, s, s.task)
    img, mask = ds[0]
    assert img.shape[1:] == mask.shape and any(s > 32 for s in mask.shape)


def test_linprobe_freezes_encoder_and_reloads_for_prediction(demo, mae64, tmp_path):
    out = tmp_path / "lp"
    main_finetune.cli_main(ft_args(demo, out, "--linprobe", "--finetune", mae64, size=(64,)))
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["meta"]["linprobe"] is True and ckpt["args"]["blr"] == 0.1
    assert "head.0.running_mean" in ckpt["model"] and ckpt["model"]["head.1.weight"].shape == (1, 192)
    mae = load(mae64)["model"]
    assert torch.equal(ckpt["model"]["blocks.3.mlp.fc1.weight"], mae["module.blocks.3.mlp.fc1.weight"])
    from models_build import load_for_inference

    model, _, _ = load_for_inference(read_record(out / "checkpoint-last.pth"))
    assert isinstance(model.head[0], torch.nn.BatchNorm1d) and model(torch.rand(1, 1, 64, 64, 64)).shape == (1, 1)


def test_mae_trained_at_64_loads_into_a_32x64x64_classifier(tmp_path):
    from models_build import finetune_model

    mae64 = save_tiny_mae(tmp_path / "mae.pth")
    meta = RunMeta.from_dict(dict(task="classification", mode="binary", model="vit_tiny_patch16", nb_classes=2,
                                  nb_outputs=1, label_names=["0", "1"], input_size=[32, 64, 64],
                                  patch_size=[16, 16, 16], global_pool="avg", linprobe=False))
    model = finetune_model(meta, read_record(mae64), str(mae64))
    mae = load(mae64)["model"]
    sd = model.state_dict()
    assert torch.equal(sd["blocks.11.attn.qkv.weight"], mae["module.blocks.11.attn.qkv.weight"])
    assert torch.equal(sd["patch_embed.proj.weight"], mae["module.patch_embed.proj.weight"])
    table = torch.from_numpy(get_3d_sincos_pos_embed(192, (2, 4, 4), cls_token=True))
    torch.testing.assert_close(sd["pos_embed"][0], table)
    assert sd["head.weight"].abs().max() < 1e-3  # fresh head, MAE init


def test_layer_decay_groups_scale_lr_from_head_to_patch_embedding():
    from models_build import build_model_from_meta
    from util.train.lr_sched import adjust_learning_rate
    from util.train.settings import Schedule, TrainSettings

    meta = dict(mode="binary", model="vit_tiny_patch16", nb_outputs=1, input_size=[32, 64, 64],
                patch_size=[16, 16, 16])
    model = build_model_from_meta(RunMeta.from_dict(meta))
    schedule = Schedule(lr=1.0, epochs=10, warmup_epochs=0)
    opt = engine_finetune.build_optimizer(model, TrainSettings("cpu", schedule=schedule), weight_decay=0.05,
                                          layer_decay=0.5)
    assert isinstance(opt, torch.optim.AdamW)
    adjust_learning_rate(opt, 0.0, schedule)
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert where[id(named["head.weight"])]["lr"] == 1.0
    assert where[id(named["blocks.11.mlp.fc1.weight"])]["lr"] == 0.5
    assert where[id(named["blocks.0.mlp.fc1.weight"])]["lr"] == 0.5 ** 12
    assert where[id(named["patch_embed.proj.weight"])]["lr"] == 0.5 ** 13
    assert where[id(named["cls_token"])]["weight_decay"] == 0.0 and where[id(named["blocks.0.norm1.bias"])][
        "weight_decay"] == 0.0
    assert where[id(named["blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05


def test_encoder_mismatch_fails_with_one_sentence_naming_key_and_shapes(demo, mae64, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main_finetune.cli_main(ft_args(demo, tmp_path / "x", "--model", "vit_small_patch16", "--finetune", mae64))
    assert err.value.code == 2
    msg = capsys.readouterr().err.strip().splitlines()[-1]  # one "error: ..." line, no traceback
    assert msg.startswith("error:") and "cls_token" in msg and "(1, 1, 192)" in msg and "(1, 1, 384)" in msg and msg.count("\n") == 0


def test_unsafe_pickle_is_refused(demo, tmp_path, capsys):
    from tests.helpers import make_hostile_checkpoint

    bad = tmp_path / "bad.pth"
    make_hostile_checkpoint(bad, tmp_path / "code_ran")
    with pytest.raises(SystemExit):
        main_finetune.cli_main(ft_args(demo, tmp_path / "x", "--finetune", bad))
    err = capsys.readouterr().err
    assert "unsafe pickle" in err and "io.open" in err and not (tmp_path / "code_ran").exists()


def test_demo_preset_finetunes_demo_checkpoint_and_explicit_flags_win(demo, tmp_path, monkeypatch, capsys):
    import functools
    import shutil

    import util.data.demo

    monkeypatch.chdir(tmp_path)
    shutil.copytree(Path(demo["train"]).parent, tmp_path / "demo_data")  # reused: the manifest matches these params
    monkeypatch.setattr(util.data.demo, "make_demo_data",
                        functools.partial(util.data.demo.make_demo_data, n_pretrain=4, n_labeled=20, seed=1))
    with pytest.raises(SystemExit):
        main_finetune.cli_main(["--epochs", "1"])
    assert "python main_pretrain.py" in capsys.readouterr().err
    save_tiny_mae(tmp_path / "output_dir" / "demo_pretrain" / "checkpoint-last.pth", size=32, prefix="")
    main_finetune.cli_main(["--epochs", "1", "--input_size", "32", "--num_workers", "0", "--device", "cpu",
                            "--cache_dir", demo["cache"], "--batch_size", "4", "--patch_size", "16"])  # the saved MAE
    assert "demo preset" in capsys.readouterr().out
    ckpt = load(tmp_path / "output_dir" / "demo_finetune" / "checkpoint-last.pth")
    assert ckpt["args"]["model"] == "vit_tiny_patch16" and ckpt["meta"]["input_size"] == [32, 32, 32]
    assert ckpt["args"]["finetune"].endswith(os.path.join("demo_pretrain", "checkpoint-last.pth"))
    assert ckpt["args"]["epochs"] == 1 and ckpt["args"]["batch_size"] == 4
    assert ckpt["args"]["linprobe"] and ckpt["args"]["blr"] == 3.0 and ckpt["args"]["weight_decay"] == 0.0


def test_linprobe_optimizer_trains_the_head_at_a_small_batch():
    """At batch 16 the MAE LARS recipe must still fit a linearly separable rule on frozen features."""
    from engine_finetune import build_optimizer
    from util.train.settings import Schedule, TrainSettings

    torch.manual_seed(0)
    feats = torch.randn(512, 192) * 3 + 1
    labels = (feats[:, :8].sum(1) > 8).float()
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(192, affine=False), torch.nn.Linear(192, 1))
    torch.nn.init.trunc_normal_(head[1].weight, std=0.01)
    head[1].bias.data.zero_()
    settings = TrainSettings("cpu", batch_size=16, schedule=Schedule(lr=0.1 * 16 / 256, epochs=1))
    opt = build_optimizer(head, settings, weight_decay=0.0, linprobe=True)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for step in range(320):
        i = torch.randint(0, 512, (16,))
        opt.zero_grad()
        loss_fn(head(feats[i]).squeeze(1), labels[i]).backward()
        opt.step()
    head.eval()
    acc = ((head(feats).squeeze(1) > 0).float() == labels).float().mean().item()
    assert acc > 0.9, acc


def test_linprobe_head_evaluates_like_it_trains_on_features_of_small_variance():
    """Pooled ViT features vary by ~1e-3 across volumes; after a few steps the probe's running statistics must be
    theirs (not still the initial running_var of 1), or every evaluation logit is squashed towards zero."""
    from models_build import build_model_from_meta

    model = build_model_from_meta(RunMeta.from_dict(dict(model="vit_tiny_patch16", input_size=[16, 16, 16],
                                                         patch_size=[16, 16, 16], nb_outputs=1, mode="binary",
                                                         linprobe=True)))
    bn = model.head[0]
    torch.manual_seed(0)
    feats = 0.8 + 3e-3 * torch.randn(64, model.num_features)
    bn.train()
    for step in range(30):  # 30 steps of 16: the demo probe's whole run
        bn(feats[torch.randint(0, 64, (16,))])
    bn.eval()
    train_mode = torch.nn.functional.batch_norm(feats, None, None, training=True, eps=bn.eps)
    gap = (bn(feats) - train_mode).abs().mean()  # sampling noise of 30 batch means: ~0.05; momentum 0.1: ~0.8
    assert gap < 0.15, gap
    assert bn(feats).std() > 0.8  # standardised, not squashed


def test_segmentation_on_one_labelled_ct_takes_a_batch_of_crops_from_one_read(shared_data, tmp_path, monkeypatch,
                                                                             capsys):
    import util.volume.preprocess

    ct, liver = shared_data / "ircadb01" / "ct.nii.gz", shared_data / "ircadb01" / "mask_liver.nii.gz"
    pd.DataFrame({"Path": [str(ct)], "Mask": [str(liver)]}).to_csv(tmp_path / "one.csv", index=False)
    base = ["--task", "segmentation", "--train_csv", str(tmp_path / "one.csv"), "--model", "vit_tiny_patch16",
            "--input_size", "32", "--spacing", "6", "6", "6", "--feature_size", "8", "--epochs", "2",
            "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu", "--output_dir", str(tmp_path / "seg")]
    with pytest.raises(SystemExit):  # the default batch of 8 from 1 volume: one sentence says what to do
        main_finetune.cli_main(base)
    assert "--crops_per_volume" in capsys.readouterr().err
    reads, real = [], util.volume.preprocess.read_image
    monkeypatch.setattr(util.volume.preprocess, "read_image", lambda p: reads.append(str(p)) or real(p))
    main_finetune.cli_main([*base, "--crops_per_volume", "8"])
    lines = log_lines(tmp_path / "seg")
    assert [x["epoch"] for x in lines] == [1, 2] and all(x["train_loss"] > 0 for x in lines)
    assert reads.count(str(ct)) == 1 and reads.count(str(liver)) == 1  # 16 crops, one read of image and mask
