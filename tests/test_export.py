"""main_export.py round trips: a checkpoint and the model folder exported from it give main_predict.py the same
CSV, embeddings and label maps, for every task type; TANGERINE-shaped weights give the same encoder features and
their folder names the TANGERINE preprocessing; --finetune DIR and --init DIR load what the checkpoint loads."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

import main_export
import main_predict
import models_mae3d
from models_build import build_model_from_meta, load_for_inference, load_mae_init
from models_hub import from_pretrained
from tests.bad_inputs import good_volume
from tests.helpers import run_in_process, state_dicts_equal
from util.checkpoint import load_checkpoint, save_atomic
from util.task.record import read_record
from util.data.manifest import read_manifest, write_manifest
from util.run_folder import MANIFEST
from util.task.meta import RunMeta
from util.task.tasks import task_named
from util.volume.preprocess import PreprocessConfig

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network
SIZE = (32, 32, 32)
PRE = PreprocessConfig(orientation="RAS", size=SIZE, window=(-1000.0, 400.0), interpolator="linear")


def tiny_finetuned(path, mode: str, nb_classes: int, seed: int = 0, pool: str = "avg", **meta_extra) -> torch.nn.Module:
    """A tiny finetuned checkpoint as main_finetune.py writes it (meta, preprocessing, recipe), random head."""
    torch.manual_seed(seed)
    columns = ["a", "b", "c"] if mode in ("multilabel", "regression") else ["Label"]
    names = columns if len(columns) > 1 else [f"class{k}" for k in range(nb_classes)]
    task = task_named(mode)
    meta = dict(task=task.family, mode=mode, model="vit_tiny_patch16", nb_classes=nb_classes,
                nb_outputs=task.nb_outputs(nb_classes, len(columns)), label_names=names, label_columns=columns,
                input_size=list(SIZE), patch_size=[16, 16, 16], global_pool=pool, feature_size=8, **meta_extra)
    model = build_model_from_meta(RunMeta.from_dict(meta))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("head.", "out.")):
                p.normal_(0, 0.5)
    recipe = {"model": "vit_tiny_patch16", "input_size": list(SIZE), "lr": 1e-3, "seed": 0, "mode": mode,
              "train_csv": "/hospital/site-a/labels.csv", "table": "40 rows sha256:ab12"}
    save_atomic({"model": model.state_dict(), "meta": meta, "preprocess": PRE.to_dict(), "epoch": 3,
                 "recipe": recipe, "args": {"smoothing": 0.1, "train_csv": "/hospital/site-a/labels.csv"}}, path)
    return model


def tiny_mae_checkpoint(path, prefix: str = "", decoder: bool = True, ours: bool = False, scans=None):
    """A tiny MAE: ours (mae_pretrained.pth: args with the manifest record, preprocessing; the manifest of `scans`
    written beside it when given) or TANGERINE-shaped ({'model': state dict}, optionally `module.`-prefixed, with
    or without the decoder)."""
    torch.manual_seed(1)
    mae = models_mae3d.mae_vit_tiny_patch16(img_size=SIZE, decoder_depth=1).eval()
    sd = {prefix + k: v for k, v in mae.state_dict().items() if decoder or not (k.startswith("decoder_") or
                                                                                 k == "mask_token")}
    if ours:
        name, digest = write_manifest(list(map(str, scans)), str(path.parent)) if scans else (MANIFEST, "0" * 64)
        args = {"model": "mae_vit_tiny_patch16", "input_size": list(SIZE), "norm_pix_loss": False, "blr": 1.5e-4,
                "data_path": "/data/scans.csv", "data_manifest": name, "data_manifest_sha256": digest}
        save_atomic({"model": sd, "args": args, "preprocess": PRE.to_dict()}, path)
    else:
        torch.save({"model": sd}, path)
    return mae


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vols")
    rows = []
    for k, shape in enumerate([(20, 24, 28), (16, 40, 40), (24, 20, 30), (18, 32, 26)]):
        good_volume(root / f"v{k}.nii.gz", shape=shape, seed=k)
        rows.append({"Path": f"v{k}.nii.gz", "ID": f"p{k}", "Label": k % 2})
    pd.DataFrame(rows).to_csv(root / "in.csv", index=False)
    return root


def export(src, dst, *flags) -> None:
    r = run_in_process("main_export.py", src, dst, *flags)
    assert r.returncode == 0, r.stderr[-2000:]


def predict(*argv) -> int:
    return main_predict.main(main_predict.parse_args([*map(str, argv), "--device", "cpu", "--num_workers", "0"]))


def outputs_of(volumes, source, out, csv: bool = True, embeddings: str | None = None, seg: bool = False) -> dict:
    """main_predict.py's outputs for `source`: the CSV text, the embeddings (pooled as `embeddings` says) and every
    label map's voxels and origin."""
    args = ["--input_csv", volumes / "in.csv", "--finetune", source]
    args += ["--output_csv", out / "p.csv"] if csv else []
    args += ["--embeddings", out / "e.npy", "--embedding_type", embeddings] if embeddings else []
    args += ["--seg_output_dir", out / "seg"] if seg else []
    assert predict(*args) == 0
    got = {"csv": (out / "p.csv").read_text().replace(str(out), "OUT")} if csv else {}  # label-map paths
    if embeddings:
        got["emb"] = np.load(out / "e.npy")
    if seg:
        images = {p.name: sitk.ReadImage(str(p)) for p in sorted((out / "seg").iterdir())}
        got["masks"] = {name: (sitk.GetArrayFromImage(img), img.GetOrigin(), img.GetSpacing())
                        for name, img in images.items()}
    return got


@pytest.mark.parametrize("mode,classes,embeddings,seg,head", [
    ("binary", 2, "cat", False, {}),
    ("multiclass", 3, None, False, {}),
    ("multiclass", 4, "cls", False, {"linprobe": True, "pool": "cat"}),  # BatchNorm + Linear head on [cls, avg]
    ("multilabel", 3, None, False, {}),
    ("regression", 3, "avg", False, {"pool": "token"}),
    ("segmentation", 3, None, True, {}),
])
def test_a_folder_predicts_exactly_what_its_checkpoint_predicts(volumes, tmp_path, mode, classes, embeddings, seg,
                                                                 head):
    tiny_finetuned(tmp_path / "ft.pth", mode, classes, **head)
    export(tmp_path / "ft.pth", tmp_path / "folder")
    assert sorted(os.listdir(tmp_path / "folder")) == ["README.md", "config.json", "model.safetensors"]
    a = outputs_of(volumes, tmp_path / "ft.pth", tmp_path / "a", embeddings=embeddings, seg=seg)
    b = outputs_of(volumes, tmp_path / "folder", tmp_path / "b", embeddings=embeddings, seg=seg)
    assert a["csv"] == b["csv"] and len(a["csv"].splitlines()) == 5  # the same bytes: every probability and label
    if embeddings:
        assert np.array_equal(a["emb"], b["emb"])
    if seg:
        assert len(a["masks"]) == 4 and a["masks"].keys() == b["masks"].keys()
        for name, (voxels, origin, spacing) in a["masks"].items():
            assert np.array_equal(voxels, b["masks"][name][0]) and (origin, spacing) == b["masks"][name][1:]
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["task"]["type"] == mode and config["task"]["origin"] == "checkpoint"
    assert config["preprocessing"]["settings"] == PRE.to_dict()  # exactly what training used
    assert config["provenance"]["recipe"]["train_csv"] == "labels.csv"  # no absolute path leaves the machine
    assert config["provenance"]["epochs_completed"] == 4  # 'epoch' 3 counts from 0
    # the dict the folder hands to every script is the checkpoint's
    ckpt, folder = load_checkpoint(tmp_path / "ft.pth"), load_checkpoint(tmp_path / "folder")
    assert RunMeta.from_dict(folder["meta"]) == RunMeta.from_dict(ckpt["meta"])
    assert folder["meta"]["feature_size"] == 8 and folder["preprocess"] == ckpt["preprocess"]
    assert folder["recipe"]["table"] == ckpt["recipe"]["table"] and folder["args"]["smoothing"] == 0.1
    assert state_dicts_equal(folder["model"], ckpt["model"])


def test_a_pretraining_folder_gives_the_same_embeddings_and_records_its_data(volumes, tmp_path):
    scans = sorted(volumes.glob("*.nii.gz"))
    tiny_mae_checkpoint(tmp_path / "mae_pretrained.pth", ours=True, scans=scans)
    (tmp_path / "summary.md").write_text("| features | AUROC |\n|---|---|\n| ours | 0.812 (0.741-0.873) |\n")
    export(tmp_path / "mae_pretrained.pth", tmp_path / "folder", "--with_manifest", "--evaluation",
           tmp_path / "summary.md")
    assert sorted(os.listdir(tmp_path / "folder")) == ["README.md", "config.json", MANIFEST, "model.safetensors"]
    assert list(read_manifest(str(tmp_path / "folder" / MANIFEST))["path"]) == list(map(str, scans))
    for pool in ("avg", "cls", "cat"):
        a = outputs_of(volumes, tmp_path / "mae_pretrained.pth", tmp_path / f"a{pool}", csv=False, embeddings=pool)
        b = outputs_of(volumes, tmp_path / "folder", tmp_path / f"b{pool}", csv=False, embeddings=pool)
        assert np.array_equal(a["emb"], b["emb"])
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["architecture"]["kind"] == "mae" and config["architecture"]["decoder_depth"] == 1
    assert config["preprocessing"]["origin"] == "checkpoint"
    assert config["provenance"]["data_manifest_sha256"] == load_checkpoint(tmp_path / "mae_pretrained.pth")["args"][
        "data_manifest_sha256"] and config["provenance"]["data_manifest_included"]
    assert config["provenance"]["args"]["data_path"] == "scans.csv"
    card = (tmp_path / "folder" / "README.md").read_text()
    assert f"`{MANIFEST}`" in card and "included in this folder" in card
    assert "| ours | 0.812 (0.741-0.873) |" in card and config["provenance"]["evaluation"] == "summary.md"
    assert "from_pretrained" in card and "| blr | 0.00015 |" in card


@pytest.mark.parametrize("prefix,decoder", [("module.", True), ("", False)])
def test_tangerine_shaped_weights_keep_their_encoder_features(volumes, tmp_path, prefix, decoder):
    mae = tiny_mae_checkpoint(tmp_path / "tangerine.pth", prefix=prefix, decoder=decoder)
    export(tmp_path / "tangerine.pth", tmp_path / "folder")
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["preprocessing"]["origin"] == "tangerine-default"
    assert config["preprocessing"]["settings"] == PreprocessConfig(size=SIZE).to_dict()
    assert config["preprocessing"]["settings"]["window"] == [-1200.0, 800.0]
    assert config["architecture"]["kind"] == ("mae" if decoder else "vit")
    model, _ = from_pretrained(tmp_path / "folder")
    if decoder:  # the whole MAE, decoder included, with the file's tensors
        assert state_dicts_equal(model.state_dict(), mae.state_dict())
    encoder, _ = from_pretrained(tmp_path / "folder", encoder_only=True)
    reference, _, _ = load_for_inference(read_record(tmp_path / "tangerine.pth"), global_pool="token")
    x = torch.rand(2, 1, *SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(encoder.forward_features(x), reference.forward_features(x))
        latent = mae.forward_encoder(x, 0.0)[0]
    assert torch.allclose(encoder.forward_features(x)[:, 1:].mean(1), latent[:, 1:].mean(1), atol=1e-5)
    a = outputs_of(volumes, tmp_path / "tangerine.pth", tmp_path / "a", csv=False, embeddings="avg")
    b = outputs_of(volumes, tmp_path / "folder", tmp_path / "b", csv=False, embeddings="avg")
    assert np.array_equal(a["emb"], b["emb"])


def test_finetune_and_init_from_a_folder_load_what_the_checkpoint_loads(volumes, tmp_path):
    tiny_mae_checkpoint(tmp_path / "mae.pth", ours=True)
    export(tmp_path / "mae.pth", tmp_path / "folder")
    runs = {}
    for name, source in (("pth", tmp_path / "mae.pth"), ("dir", tmp_path / "folder")):
        r = run_in_process("main_finetune.py", "--train_csv", volumes / "in.csv", "--val_csv", volumes / "in.csv",
                           "--epochs", 1, "--batch_size", 2, "--num_workers", 0, "--device", "cpu",
                           "--finetune", source, "--output_dir", tmp_path / name)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = load_checkpoint(tmp_path / name / "checkpoint-last.pth")
    assert state_dicts_equal(runs["pth"]["model"], runs["dir"]["model"])  # the same run, to the last bit
    assert runs["dir"]["preprocess"] == runs["pth"]["preprocess"] == PRE.to_dict()  # adopted from the folder
    # continued pretraining (main_pretrain.py --init) takes the same tensors from either
    loaded = []
    for source in (tmp_path / "mae.pth", tmp_path / "folder"):
        torch.manual_seed(0)
        model = models_mae3d.mae_vit_tiny_patch16(img_size=(64, 64, 64), decoder_depth=1)
        load_mae_init(model, read_record(source), str(source))
        loaded.append(model.state_dict())
    assert state_dicts_equal(*loaded)


def test_the_same_checkpoint_gives_the_same_bytes(tmp_path):
    tiny_finetuned(tmp_path / "ft.pth", "multiclass", 3)
    export(tmp_path / "ft.pth", tmp_path / "one", "--license", "cc-by-4.0")
    export(tmp_path / "ft.pth", tmp_path / "two", "--title", "one", "--license", "cc-by-4.0")
    for name in os.listdir(tmp_path / "one"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    export(tmp_path / "one", tmp_path / "again", "--title", "one", "--license", "cc-by-4.0")  # a folder re-exported
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    first = json.loads((tmp_path / "one" / "config.json").read_text())
    assert again == first
    assert (tmp_path / "again" / "README.md").read_text() == (tmp_path / "one" / "README.md").read_text()
