"""Checkpoints as users of the original project and of TANGERINE have them load everywhere, with weights_only.

The fixtures are written here with the original code's key names and containers (not by importing it):
misc.save_model's {'model', 'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace}, an encoder-only MAE
state dict (how the published TANGERINE file is described), {'state_dict'} / {'model_state'} containers, and
the original finetuned classifier (best_model_loss.pth: a raw, `module.`-prefixed ViT state dict with fc_norm
and head).
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
import torch

import models_mae3d
import models_vit3d
from tests.bad_inputs import good_volume
from tests.helpers import load, run_in_process
from util.task.record import read_record

SIZE = 32


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Five volumes with labels, and the checkpoint files."""
    root = tmp_path_factory.mktemp("compat")
    rows = []
    for k in range(6):
        good_volume(root / f"v{k}.nii.gz", shape=(20 + k, 24, 28), seed=k)
        rows.append({"Path": f"v{k}.nii.gz", "Label": k % 2})
    pd.DataFrame(rows).to_csv(root / "cases.csv", index=False)
    torch.manual_seed(0)
    mae = models_mae3d.mae_vit_tiny_patch16(img_size=SIZE, decoder_depth=1)
    sd = mae.state_dict()
    opt = torch.optim.AdamW(mae.parameters())
    ns = argparse.Namespace(model="mae_vit_tiny_patch16", input_size=SIZE, mask_ratio=0.75, norm_pix_loss=False,
                            batch_size=2, epochs=400, blr=1.5e-4, output_dir="./output_dir", device="cuda")
    torch.save({"model": sd, "optimizer": opt.state_dict(), "epoch": 399,
                "scaler": torch.amp.GradScaler("cpu").state_dict(), "args": ns}, root / "original_mae.pth")
    encoder = {k: v for k, v in sd.items() if not k.startswith("decoder_") and k != "mask_token"}
    torch.save(encoder, root / "encoder_only.pth")
    torch.save({f"module.{k}": v for k, v in encoder.items()}, root / "encoder_only_ddp.pth")
    torch.save({"state_dict": sd}, root / "state_dict.pth")
    torch.save({"model_state": {f"module.{k}": v for k, v in sd.items()}}, root / "model_state.pth")
    clf = models_vit3d.vit_tiny_patch16(img_size=SIZE, num_classes=3, global_pool="avg")
    with torch.no_grad():
        clf.head.weight.normal_(0, 0.5)
    torch.save({f"module.{k}": v for k, v in clf.state_dict().items()}, root / "best_model_loss.pth")
    shallow = models_mae3d.mae_vit_tiny_patch16(img_size=SIZE, depth=2, decoder_depth=1)
    torch.save({"model": shallow.state_dict()}, root / "two_blocks.pth")
    return root, mae, clf


def finetune_args(root, init, out, *extra):
    return ["--train_csv", root / "cases.csv", "--val_csv", root / "cases.csv", "--model", "vit_tiny_patch16",
            "--input_size", SIZE, "--epochs", 1, "--batch_size", 2, "--num_workers", 0, "--device", "cpu",
            "--finetune", root / init, "--output_dir", out, *extra]


def test_the_original_training_dict_with_a_namespace_loads_with_weights_only(cases):
    root, mae, _ = cases
    rec = read_record(root / "original_mae.pth")
    assert rec.args["input_size"] == SIZE and rec.args["model"] == "mae_vit_tiny_patch16"
    assert rec.epoch == 399 and torch.equal(rec.weights["cls_token"], mae.cls_token)


@pytest.mark.parametrize("init", ["original_mae.pth", "encoder_only.pth", "encoder_only_ddp.pth", "state_dict.pth",
                                  "model_state.pth"])
def test_every_pretrained_form_finetunes(cases, tmp_path, init):
    root, mae, _ = cases
    r = run_in_process("main_finetune.py", *finetune_args(root, init, tmp_path / "ft"))
    assert r.returncode == 0, r.stderr[-2000:]
    sd = load(tmp_path / "ft" / "checkpoint-last.pth")["model"]
    assert "Loaded 147 tensors" in r.stdout  # 12 blocks x 12 + patch embedding (2) + cls (avg pool drops norm)
    assert not torch.equal(sd["blocks.0.attn.qkv.weight"], torch.zeros_like(sd["blocks.0.attn.qkv.weight"]))


def test_linear_probe_and_embeddings_from_encoder_only_and_original_files(cases, tmp_path):
    root, mae, _ = cases
    r = run_in_process("main_finetune.py", *finetune_args(root, "encoder_only_ddp.pth", tmp_path / "lp", "--linprobe"))
    assert r.returncode == 0, r.stderr[-2000:]
    lp = load(tmp_path / "lp" / "checkpoint-last.pth")["model"]
    assert torch.equal(lp["blocks.5.mlp.fc1.weight"], mae.state_dict()["blocks.5.mlp.fc1.weight"])  # frozen
    embs = []
    for init in ("original_mae.pth", "encoder_only.pth"):  # args['input_size'] is one int in the original dict
        out = tmp_path / f"{init}.npy"
        r = run_in_process("main_predict.py", "--input_csv", root / "cases.csv", "--embeddings", out, "--finetune",
                           root / init, "--device", "cpu", "--num_workers", 0)
        assert r.returncode == 0, r.stderr[-2000:]
        embs.append(np.load(out))
    assert embs[0].shape == (6, 192) and np.allclose(embs[0], embs[1], atol=1e-5) and embs[0].std(0).mean() > 0


def test_the_original_finetuned_classifier_predicts_probabilities(cases, tmp_path):
    root, _, clf = cases
    out = tmp_path / "pred.csv"
    r = run_in_process("main_predict.py", "--input_csv", root / "cases.csv", "--output_csv", out, "--finetune",
                       root / "best_model_loss.pth", "--device", "cpu", "--num_workers", 0)
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_csv(out)
    probs = df[["prob_0", "prob_1", "prob_2"]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and probs.std(0).max() > 1e-3
    from util.volume.preprocess import PreprocessConfig, load_volume

    x = torch.from_numpy(load_volume(str(root / "v2.nii.gz"), PreprocessConfig(size=(SIZE,) * 3)))[None, None]
    with torch.no_grad():
        expect = clf.eval()(x).softmax(-1)[0].numpy()
    np.testing.assert_allclose(probs[2], expect, atol=1e-5)
    assert list(df["pred"].astype(str)) == [str(k) for k in probs.argmax(1)]


def test_an_encoder_with_fewer_blocks_stops_with_one_sentence(cases, tmp_path):
    root, _, _ = cases
    r = run_in_process("main_finetune.py", *finetune_args(root, "two_blocks.pth", tmp_path / "x"))
    err = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1, r.stderr[-2000:]
    assert "two_blocks.pth" in err[0] and "2 blocks" in err[0] and "12" in err[0]
    assert not (tmp_path / "x" / "checkpoint-last.pth").exists()
