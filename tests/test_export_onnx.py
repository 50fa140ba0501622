"""The exported ONNX graphs run in onnxruntime as in PyTorch (1e-4, float32, two batch sizes); hubconf.py serves
torch.hub; a folder published on a hub loads by repo id from the local cache with the network forbidden."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch

from models_hub import from_pretrained
from tests.helpers import ROOT, run_in_process, state_dicts_equal
from tests.test_export import SIZE, tiny_finetuned, tiny_mae_checkpoint
from util.model_folder import meta_of
from util.task.meta import RunMeta

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A binary classifier and an MAE of ours, each exported with --onnx."""
    root = tmp_path_factory.mktemp("onnx")
    tiny_finetuned(root / "clf.pth", "binary", 2)
    tiny_mae_checkpoint(root / "mae.pth", ours=True)
    for name in ("clf", "mae"):
        r = run_in_process("main_export.py", root / f"{name}.pth", root / name, "--onnx")
        assert r.returncode == 0, r.stderr[-2000:]
    return root


def session(path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 3])
def test_the_onnx_encoder_and_head_match_pytorch(folders, batch):
    x = torch.rand(batch, 1, *SIZE, generator=torch.Generator().manual_seed(batch))
    model, config = from_pretrained(folders / "clf")
    assert sorted(os.listdir(folders / "clf")) == ["README.md", "config.json", "encoder.onnx", "head.onnx",
                                                   "model.safetensors"]
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model.forward_head(tokens)
        probs = RunMeta.from_dict(meta_of(config)).task.probabilities(logits)
    (got,) = session(folders / "clf" / "encoder.onnx").run(None, {"volume": x.numpy()})
    assert got.shape == (batch, 9, 192) and np.abs(got - tokens.numpy()).max() <= 1e-4
    got_logits, got_probs = session(folders / "clf" / "head.onnx").run(None, {"tokens": got})
    assert got_probs.shape == (batch, 2) and np.allclose(got_probs.sum(1), 1, atol=1e-6)
    assert np.abs(got_logits - logits.numpy()).max() <= 1e-4 and np.abs(got_probs - probs.numpy()).max() <= 1e-4
    encoder, _ = from_pretrained(folders / "mae", encoder_only=True)
    with torch.no_grad():
        latent = encoder.forward_features(x).numpy()
    (got,) = session(folders / "mae" / "encoder.onnx").run(None, {"volume": x.numpy()})
    assert np.abs(got - latent).max() <= 1e-4
    assert not (folders / "mae" / "head.onnx").exists()  # an MAE has no head


def test_the_onnx_graphs_are_recorded_and_reproducible(folders, tmp_path):
    config = json.loads((folders / "clf" / "config.json").read_text())
    assert config["onnx"]["encoder"]["input"] == ["batch", 1, 32, 32, 32]
    assert config["onnx"]["encoder"]["output"] == ["batch", 9, 192]
    assert config["onnx"]["encoder"]["max_abs_diff"] <= 1e-4 and config["onnx"]["head"]["output"] == ["batch", 2]
    assert "encoder.onnx" in (folders / "clf" / "README.md").read_text()
    r = run_in_process("main_export.py", folders / "clf.pth", tmp_path / "again", "--onnx", "--title", "clf")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in os.listdir(folders / "clf"):
        assert (folders / "clf" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_hubconf_serves_the_registry_and_model_folders(folders):
    mae = torch.hub.load(str(ROOT), "mae_vit_tiny_patch16", source="local", img_size=32, decoder_depth=1)
    assert type(mae).__name__ == "MaskedAutoencoderViT3D" and tuple(mae.cls_token.shape) == (1, 1, 192)
    vit = torch.hub.load(str(ROOT), "vit_base_patch16", source="local", img_size=32, num_classes=0)
    assert vit.embed_dim == 768
    model = torch.hub.load(str(ROOT), "model_folder", str(folders / "mae"), source="local")
    reference, _ = from_pretrained(folders / "mae")
    assert state_dicts_equal(model.state_dict(), reference.state_dict())
    assert model.config["architecture"]["kind"] == "mae" and not model.training


def hub_cache(folder, cache, repo: str = "lab/ct-mae") -> None:
    """The hub cache as huggingface_hub lays a downloaded repo out: refs/main names a snapshot holding the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo_dir / "snapshots" / commit)


def test_a_repo_id_loads_from_the_cache_with_the_network_forbidden(folders, tmp_path):
    hub_cache(folders / "mae", tmp_path / "hub")
    model, config = from_pretrained("lab/ct-mae", cache_dir=tmp_path / "hub", local_files_only=True)
    reference, _ = from_pretrained(folders / "mae")
    assert state_dicts_equal(model.state_dict(), reference.state_dict()) and config["architecture"]["kind"] == "mae"
    # a fresh interpreter with HF_HUB_OFFLINE=1 and an endpoint that cannot answer: the cache alone serves it
    code = ("from models_hub import from_pretrained\n"
            f"m, c = from_pretrained('lab/ct-mae', cache_dir={str(tmp_path / 'hub')!r})\n"
            "print('loaded', type(m).__name__)\n"
            f"from_pretrained('lab/absent', cache_dir={str(tmp_path / 'hub')!r})\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert "loaded MaskedAutoencoderViT3D" in r.stdout, r.stderr[-2000:]
    assert r.returncode != 0 and "lab/absent is not a local folder and the hub repo lab/absent is not in the local " \
                                 "cache" in r.stderr


def test_the_onnx_benchmark_runs(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_onnx", ROOT / "bench" / "bench_onnx.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (result,) = bench.main(["--quick", "--threads", "1", "--json", str(tmp_path / "r.json")])
    assert result["max_abs_diff"] <= 1e-4 and result["per_volume_s"]["onnxruntime"]["median"] > 0
    assert json.loads((tmp_path / "r.json").read_text())[0]["config"] == "tiny:32"
