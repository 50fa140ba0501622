"""Continued pretraining (issue 22): `main_pretrain.py --init CKPT` starts from the weights of any MAE checkpoint the
project reads, regenerates the positional tables for the new grid, records the file in the recipe, and a restart
resumes its own checkpoint instead of the initial weights. (That the weights are really used on the demo:
tests/test_demo_learning.py, which has the demo MAE.)"""
from __future__ import annotations

import argparse

import pytest
import torch

import models_mae3d
import models_vit3d
from models_build import load_mae_init
from util.task.record import CheckpointRecord, read_record
from tests.helpers import load, run_in_process, run_script, state_dicts_equal, tiny_pretrain_args
from util.data.demo import make_demo_data
from util.errors import UserError


def tiny_mae(size=64, seed=0, **kw):
    torch.manual_seed(seed)
    return models_mae3d.mae_vit_tiny_patch16(img_size=size, **kw)


def fresh_model(size=32):
    return tiny_mae(size, seed=1)


def test_tangerine_style_file_loads_encoder_and_decoder_at_a_new_grid(capsys):
    src = tiny_mae(64).state_dict()
    model = fresh_model(32)
    table, dec_table = model.pos_embed.clone(), model.decoder_pos_embed.clone()
    ckpt = {"model": {"module." + k: v for k, v in src.items()}}  # DDP prefixes, as TANGERINE's files have
    keys = load_mae_init(model, CheckpointRecord.from_dict(ckpt), "tangerine.pth")
    out = model.state_dict()
    assert all(torch.equal(out[k], src[k]) for k in out if "pos_embed" not in k)  # every weight, decoder too
    assert torch.equal(out["pos_embed"], table) and torch.equal(out["decoder_pos_embed"], dec_table)  # 2^3 grid
    assert out["pos_embed"].shape[1] == 9 and src["pos_embed"].shape[1] == 65
    assert keys["dropped"] == ["pos_embed", "decoder_pos_embed"] and keys["missing"] == []
    said = capsys.readouterr().out
    assert "loaded 204 tensors" in said and "regenerated for grid (2, 2, 2)" in said


def test_encoder_only_file_gets_a_fresh_decoder_said_in_one_line(tmp_path, capsys):
    src = {k: v for k, v in tiny_mae(64).state_dict().items() if not k.startswith("decoder_") and k != "mask_token"}
    path = tmp_path / "encoder.pth"
    torch.save({"state_dict": src}, path)
    model = fresh_model(32)
    decoder = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("decoder_")}
    keys = load_mae_init(model, read_record(path), str(path))
    out = model.state_dict()
    assert all(torch.equal(out[k], src[k]) for k in src if k != "pos_embed")
    assert all(torch.equal(out[k], v) for k, v in decoder.items())  # the constructor's initialisation, kept
    assert len(keys["missing"]) == 55 and "mask_token" in keys["missing"]
    lines = [x for x in capsys.readouterr().out.splitlines() if "encoder only" in x]
    assert lines == [f"--init {path} holds an encoder only: the decoder (55 tensors) is freshly initialised."]


def test_original_project_training_checkpoint_and_a_vit_without_final_norm(tmp_path):
    src = tiny_mae(64).state_dict()
    path = tmp_path / "checkpoint-399.pth"  # misc.save_model: args is an argparse.Namespace
    torch.save({"model": src, "optimizer": {"state": {}, "param_groups": []}, "epoch": 399, "scaler": {},
                "args": argparse.Namespace(input_size=64, model="mae_vit_tiny_patch16")}, path)
    model = fresh_model(32)
    load_mae_init(model, read_record(path), str(path))
    assert torch.equal(model.state_dict()["blocks.11.mlp.fc2.weight"], src["blocks.11.mlp.fc2.weight"])
    torch.manual_seed(3)
    vit = models_vit3d.vit_tiny_patch16(img_size=32, global_pool="avg", num_classes=2)  # fc_norm, head, no norm
    model = fresh_model(32)
    norm = model.norm.weight.clone()
    keys = load_mae_init(model, CheckpointRecord.from_dict({"model": vit.state_dict()}), "vit.pth")
    assert torch.equal(model.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert torch.equal(model.norm.weight, norm) and keys["missing"][:2] == ["norm.weight", "norm.bias"]
    assert {"head.weight", "fc_norm.weight"} <= set(keys["dropped"])


@pytest.mark.parametrize("ckpt, expected", [
    ({"model": {"w": torch.zeros(2)}}, "holds no MAE or ViT encoder"),
    ({"model": models_mae3d.mae_vit_small_patch16(img_size=32, depth=12).state_dict()},
     "a 384 x 12 encoder (width x depth), --model a 192 x 12 one; pass --model mae_vit_small_patch16"),
    ({"model": tiny_mae(32, patch_size=8).state_dict()}, "patches of (8, 8, 8) voxels, the model (16, 16, 16); pass "
                                                         "--patch_size 8 8 8"),
])
def test_files_that_do_not_fit_are_refused_in_one_sentence(ckpt, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_mae_init(fresh_model(32), CheckpointRecord.from_dict(ckpt), "x.pth")


def test_init_with_resume_path_is_refused(tmp_path):
    r = run_in_process("main_pretrain.py", "--init", tmp_path / "a.pth", "--resume", tmp_path / "b.pth",
                       "--output_dir", tmp_path / "out")
    assert r.returncode == 2  # refused with the flags, before anything is read or written
    line = r.stderr.strip().splitlines()[-1]
    assert "exclude each other: --init starts a new run from a model's weights, --resume continues a run with its " \
           "optimizer" in line and line.startswith("error: ") and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    torch.save({"model": tiny_mae(64, seed=5).state_dict()}, root / "a.pth")
    torch.save({"model": tiny_mae(64, seed=6).state_dict()}, root / "b.pth")
    return make_demo_data(str(root / "demo_data"), n_pretrain=8, n_labeled=8, seed=2)["pretrain"], root


def test_killed_continued_run_ends_like_uninterrupted_one_and_keeps_its_initial_weights(data, tmp_path):
    csv, root = data
    ref, out = tmp_path / "ref", tmp_path / "run"
    r = run_in_process("main_pretrain.py", *tiny_pretrain_args(csv, ref, epochs=3, init=root / "a.pth"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--init" in r.stdout and "loaded 204 tensors" in r.stdout
    assert load(ref / "checkpoint-last.pth")["recipe"]["init"].startswith("a.pth sha256:")
    args = tiny_pretrain_args(csv, out, epochs=3, init=root / "a.pth")
    # killed before any checkpoint (the rerun starts from --init again), then in epoch 3 (epoch 1's checkpoint is on
    # disk by then: the next one's write waits for it)
    for point in ("step:0:2", "step:2:1"):
        r = run_script("main_pretrain.py", *args, env={"MAE3D_FAULT": point})
        assert r.returncode == -9, f"expected SIGKILL at {point}, got {r.returncode}: {r.stderr[-2000:]}"
    r = run_in_process("main_pretrain.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--resume auto wins over --init: continuing" in r.stdout and "Resumed from" in r.stdout
    final = load(out / "mae_pretrained.pth")["model"]
    assert state_dicts_equal(final, load(ref / "mae_pretrained.pth")["model"])
    assert not torch.equal(final["blocks.0.attn.qkv.weight"], load(root / "a.pth")["model"]["blocks.0.attn.qkv.weight"])
    # the same run continued with other initial weights is a recipe change
    more = tiny_pretrain_args(csv, out, epochs=4, init=root / "b.pth")
    r = run_in_process("main_pretrain.py", *more)
    assert r.returncode != 0 and "another recipe (init a.pth sha256:" in r.stderr
    assert "-> b.pth sha256:" in r.stderr and "--allow_recipe_change" in r.stderr


def test_continued_pretraining_under_torchrun_starts_every_rank_from_the_file(data, tmp_path):
    """Two gloo ranks: the file is hashed once (rank 0, shared with a collective) and recorded; the weights trained
    from it stay near it, far nearer than a fresh model's (DDP's start-up broadcast happens before the file is
    loaded, so every rank loads it itself)."""
    csv, root = data
    out = tmp_path / "ddp"
    r = run_script("main_pretrain.py", *tiny_pretrain_args(csv, out, epochs=1, size=64, init=root / "a.pth"),
                   torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert load(out / "checkpoint-last.pth")["recipe"]["init"].startswith("a.pth sha256:")
    assert r.stdout.count("loaded 204 tensors") == 1  # rank 0 speaks for both
    start, trained = load(root / "a.pth")["model"], load(out / "mae_pretrained.pth")["model"]
    fresh = tiny_mae(64, seed=9).state_dict()
    key = "blocks.0.attn.qkv.weight"
    moved, other = (trained[key] - start[key]).abs().max(), (fresh[key] - start[key]).abs().max()
    assert 0 < moved < 0.1 * other, (float(moved), float(other))
