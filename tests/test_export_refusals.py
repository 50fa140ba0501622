"""Model folders are strict and safe: every refusal is one sentence naming the folder, file or field, a pickle in a
folder is never unpickled, nothing half-written is left after a failed export, nothing reaches the network."""
from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import main_export
from models_hub import from_pretrained
from tests.bad_inputs import good_volume
from tests.helpers import make_hostile_checkpoint, run_in_process
from tests.test_export import tiny_finetuned, tiny_mae_checkpoint
from util.errors import UserError
from util.digest import file_sha256
from util.model_folder import ModelFolderError

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A binary classifier checkpoint, its model folder, and a one-row table."""
    root = tmp_path_factory.mktemp("refusals")
    tiny_finetuned(root / "ft.pth", "binary", 2)
    r = run_in_process("main_export.py", root / "ft.pth", root / "folder")
    assert r.returncode == 0, r.stderr
    good_volume(root / "v.nii.gz", shape=(16, 20, 24))
    pd.DataFrame({"Path": ["v.nii.gz"]}).to_csv(root / "in.csv", index=False)
    return root


@pytest.fixture
def folder(made, tmp_path):
    """A fresh copy of the exported folder, free to damage."""
    return shutil.copytree(made / "folder", tmp_path / "copy")


def refused(script: str, *args) -> str:
    """The `error:` sentence of a script that must refuse (any non-zero status)."""
    r = run_in_process(script, *args)
    assert r.returncode != 0, r.stdout[-1000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def predict_refusal(made, folder, tmp_path) -> str:
    return refused("main_predict.py", "--input_csv", made / "in.csv", "--output_csv", tmp_path / "p.csv",
                   "--finetune", folder, "--device", "cpu", "--num_workers", 0)


def edit_config(folder, change) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def rewrite_weights(folder, change) -> None:
    """Change the tensors and record the new file's SHA-256, as a careless hand edit would."""
    sd = dict(load_file(folder / "model.safetensors"))
    change(sd)
    save_file(sd, folder / "model.safetensors")
    edit_config(folder, lambda c: c["weights"].update(sha256=file_sha256(folder / "model.safetensors")))


def test_an_export_never_lands_in_a_non_empty_folder_or_on_its_input(made, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert "is not empty" in refused("main_export.py", made / "ft.pth", tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine" and len(os.listdir(tmp_path / "busy")) == 1
    assert "is the input" in refused("main_export.py", made / "ft.pth", made / "ft.pth")
    assert "is the input" in refused("main_export.py", made / "folder", made / "folder")
    assert "inside the input folder" in refused("main_export.py", made / "folder", made / "folder" / "sub")
    (tmp_path / "file").write_text("x")
    assert "is a file" in refused("main_export.py", made / "ft.pth", tmp_path / "file")
    (tmp_path / "empty").mkdir()  # an empty folder is fine: it is filled
    assert run_in_process("main_export.py", made / "ft.pth", tmp_path / "empty").returncode == 0
    assert sorted(os.listdir(tmp_path / "empty")) == ["README.md", "config.json", "model.safetensors"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_export_leaves_nothing_behind(made, tmp_path, monkeypatch, failure):
    def fail(*a, **k):
        raise failure

    monkeypatch.setattr(main_export, "model_card", fail)  # the last file written, after the weights
    r = run_in_process("main_export.py", made / "ft.pth", tmp_path / "out")
    assert r.returncode != 0
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)  # no folder, no temporary sibling


def test_a_folder_holding_a_pickle_is_never_unpickled(made, tmp_path):
    marker = tmp_path / "code_ran"
    (tmp_path / "hub_model").mkdir()
    make_hostile_checkpoint(tmp_path / "hub_model" / "pytorch_model.bin", marker)
    sentence = predict_refusal(made, tmp_path / "hub_model", tmp_path)
    assert "pytorch_model.bin (a pickle, which is never unpickled" in sentence
    assert "never unpickled" in refused("main_export.py", tmp_path / "hub_model", tmp_path / "out")
    with pytest.raises(ModelFolderError, match="never unpickled"):
        from_pretrained(tmp_path / "hub_model")
    # beside safetensors a pickle is ignored, never opened
    shutil.copy(tmp_path / "hub_model" / "pytorch_model.bin", made / "folder" / "pytorch_model.bin")
    try:
        from_pretrained(made / "folder")
    finally:
        os.remove(made / "folder" / "pytorch_model.bin")
    assert not marker.exists()


@pytest.mark.parametrize("field,value", [("embed_dim", 384), ("patch_size", [8, 8, 8]), ("in_chans", 2),
                                         ("depth", 6), ("num_outputs", 5), ("input_size", [32, 32, 64]),
                                         ("global_pool", "cat")])
def test_a_config_that_contradicts_the_weights_is_refused_naming_the_field(made, folder, tmp_path, field, value):
    edit_config(folder, lambda c: c["architecture"].update({field: value}))
    sentence = predict_refusal(made, folder, tmp_path)
    assert f"config.json says architecture.{field} = " in sentence and "does not describe these weights" in sentence
    with pytest.raises(ModelFolderError, match=f"architecture.{field} = "):
        from_pretrained(folder)


def test_heads_the_weights_cannot_show_must_be_the_models(folder):
    edit_config(folder, lambda c: c["architecture"].update(num_heads=6))  # 192 / 6 would load, and compute otherwise
    with pytest.raises(ModelFolderError, match="architecture.num_heads = 6, but vit_tiny_patch16 has 3"):
        from_pretrained(folder)


def test_missing_and_unexpected_keys_are_named_in_one_sentence(folder):
    def change(sd):
        del sd["blocks.3.norm1.bias"]
        sd["adapter.weight"] = torch.zeros(2)

    rewrite_weights(folder, change)
    with pytest.raises(ModelFolderError) as e:
        from_pretrained(folder)
    message = str(e.value)
    assert "1 missing (blocks.3.norm1.bias)" in message and "1 unexpected (adapter.weight)" in message
    assert "\n" not in message


def test_damaged_weights_a_broken_config_and_a_newer_format_are_refused(made, folder, tmp_path):
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit in a tensor
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert "its SHA-256 differs from the one config.json records" in predict_refusal(made, folder, tmp_path)
    shutil.copy(made / "folder" / "model.safetensors", folder / "model.safetensors")
    rewrite_weights(folder, lambda sd: sd["head.weight"].fill_(float("nan")))
    assert "holds NaN or infinite values in 'head.weight'" in predict_refusal(made, folder, tmp_path)
    edit_config(folder, lambda c: c["task"].pop("classes"))
    assert "config.json: task.classes must be an integer, got None." in predict_refusal(made, folder, tmp_path)
    edit_config(folder, lambda c: (c["task"].update(classes=2), c["architecture"].update(mlp_ratio="4")))
    assert "architecture.mlp_ratio must be a number, got '4'." in predict_refusal(made, folder, tmp_path)
    edit_config(folder, lambda c: c.update(format_version=2))
    assert "has format_version 2; this code reads versions 1 to 1" in predict_refusal(made, folder, tmp_path)
    (folder / "config.json").write_text('{"format": "mae3d-model-folder", "format_ver')
    assert "config.json is not valid JSON" in predict_refusal(made, folder, tmp_path)
    os.remove(folder / "config.json")
    assert "holds model.safetensors but no config.json" in predict_refusal(made, folder, tmp_path)
    os.remove(folder / "model.safetensors")
    assert "a folder without model.safetensors: not a model folder" in predict_refusal(made, folder, tmp_path)


def test_bad_flags_and_inputs_of_the_export_are_one_sentence(made, tmp_path):
    r = run_in_process("main_export.py", made / "ft.pth", tmp_path / "out", "--opset", 9)
    assert r.returncode != 0 and "--opset: must be >= 14 and <= 20, got 9" in r.stderr
    assert "--evaluation" in refused("main_export.py", made / "ft.pth", tmp_path / "out", "--evaluation",
                                     tmp_path / "absent_summary")
    assert "records no data manifest" in refused("main_export.py", made / "ft.pth", tmp_path / "out",
                                                 "--with_manifest")
    tiny_mae_checkpoint(tmp_path / "mae.pth", ours=True)  # records data_manifest.csv.gz, sha256 0...0
    assert "is not beside" in refused("main_export.py", tmp_path / "mae.pth", tmp_path / "out", "--with_manifest")
    from util.data.manifest import write_manifest

    name, _ = write_manifest([str(made / "v.nii.gz")], str(tmp_path))  # another run's manifest, beside it
    assert "its SHA-256 differs" in refused("main_export.py", tmp_path / "mae.pth", tmp_path / "out",
                                            "--with_manifest")
    assert not (tmp_path / "out").exists() and (tmp_path / name).exists()


def test_a_repo_id_missing_from_the_cache_is_one_sentence_offline(tmp_path):
    with pytest.raises(UserError, match="not in the local cache"):
        from_pretrained("someone/absent-model", cache_dir=tmp_path / "hub", local_files_only=True)
    with pytest.raises(UserError, match="neither a model folder nor a hub repo id"):
        from_pretrained(tmp_path / "no" / "such" / "folder")
