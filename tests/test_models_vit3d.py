"""VisionTransformer3D, MAE checkpoint loading, UNETR3D segmentation and factories."""
import pickle

import pytest
import torch

from util.nn.registry import create_model

import models_mae3d as mm
import models_vit3d as mv
from util.nn.pos_embed import get_3d_sincos_pos_embed

SMALL = dict(embed_dim=24, depth=4, num_heads=2)


def small_mae(img_size=32, patch_size=16) -> mm.MaskedAutoencoderViT3D:
    torch.manual_seed(0)
    return mm.mae_vit_tiny_patch16(img_size=img_size, patch_size=patch_size, decoder_embed_dim=16,
                                   decoder_depth=1, decoder_num_heads=2, **SMALL)


def small_vit(**kw) -> mv.VisionTransformer3D:
    torch.manual_seed(1)
    return mv.vit_tiny_patch16(**{**dict(img_size=32, **SMALL), **kw})


@pytest.mark.parametrize("pool,width,has_norm", [("avg", 24, False), ("token", 24, True), ("cat", 48, False)])
def test_pooling_widths_and_keys(pool, width, has_norm):
    model = small_vit(global_pool=pool, num_classes=3).eval()
    keys = model.state_dict().keys()
    assert model.num_features == width
    assert ("norm.weight" in keys) == has_norm
    assert ("fc_norm.weight" in keys) == (not has_norm)
    if not has_norm:
        assert model.fc_norm.weight.shape == (width,)
    x = torch.rand(2, 1, 32, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 8, 24)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, width)
    assert model(x).shape == (2, 3)
    assert not model.pos_embed.requires_grad


def test_avg_pool_is_mean_of_patch_tokens_and_headless_model_returns_features():
    model = small_vit(num_classes=0).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    tokens = model.forward_features(x)
    torch.testing.assert_close(model(x), model.fc_norm(tokens[:, 1:].mean(1)))
    assert isinstance(model.head, torch.nn.Identity)
    with pytest.raises(ValueError, match="global_pool"):
        small_vit(global_pool="max")


def test_intermediate_layers_shapes_and_last_equals_features():
    model = small_vit(img_size=(16, 32, 32), patch_size=(8, 16, 16)).eval()
    x = torch.rand(2, 1, 16, 32, 32)
    feats = model.get_intermediate_layers(x, [0, 2, -1])
    assert [f.shape for f in feats] == [(2, 8, 24)] * 3
    torch.testing.assert_close(feats[-1], model.forward_features(x)[:, 1:])
    with pytest.raises(ValueError, match="block indices"):
        model.get_intermediate_layers(x, [4])


def test_vit_loaded_from_mae_reproduces_mae_encoder():
    mae, vit = small_mae().eval(), small_vit(global_pool="token").eval()
    report = mv.load_pretrained_encoder(vit, {"model": mae.state_dict()}, verbose=False)
    assert "norm.weight" in report["loaded"] and report["missing"] == ["head.weight", "head.bias"]
    imgs = torch.rand(2, 1, 32, 32, 32)
    noise = torch.arange(8.0).expand(2, -1)  # keep every token in order
    latent, _, _ = mae.forward_encoder(imgs, 0.0, noise)
    torch.testing.assert_close(vit.forward_features(imgs), latent, rtol=1e-5, atol=1e-5)


def test_load_at_other_input_size_reports_dropped_keys(capsys):
    mae = small_mae(img_size=32)
    ckpt = {"model": {f"module.{k}": v for k, v in mae.state_dict().items()}, "epoch": 3}
    vit = small_vit(img_size=(32, 64, 48), num_classes=2)
    report = mv.load_pretrained_encoder(vit, ckpt, verbose=True)
    assert "mask_token" in report["dropped"] and "decoder_pred.0.weight" in report["dropped"]
    assert "pos_embed" in report["dropped"] and "norm.weight" in report["dropped"]  # avg pool has fc_norm
    assert "fc_norm.weight" in report["missing"] and "head.weight" in report["missing"]
    assert "blocks.3.mlp.fc2.weight" in report["loaded"]
    torch.testing.assert_close(vit.blocks[3].mlp.fc2.weight, mae.blocks[3].mlp.fc2.weight)
    table = torch.from_numpy(get_3d_sincos_pos_embed(24, (2, 4, 3), cls_token=True))
    assert torch.equal(vit.pos_embed[0], table)
    out = capsys.readouterr().out
    assert "mask_token" in out and "decoder_* keys" in out and "fc_norm.weight" in out


def test_same_token_count_other_grid_still_gets_its_own_table():
    mae = small_mae(img_size=(16, 32, 64))  # grid 1x2x4, 8 tokens like a 2x2x2 grid
    vit = small_vit(img_size=32)
    mv.load_pretrained_encoder(vit, mae.state_dict(), verbose=False)
    assert torch.equal(vit.pos_embed[0], torch.from_numpy(get_3d_sincos_pos_embed(24, 2, cls_token=True)))


def test_head_loaded_only_when_it_fits():
    src = small_vit(num_classes=3)
    same, other = small_vit(num_classes=3), small_vit(num_classes=5)
    assert "head.weight" in mv.load_pretrained_encoder(same, src.state_dict(), verbose=False)["loaded"]
    assert torch.equal(same.head.weight, src.head.weight)
    assert "head.weight" in mv.load_pretrained_encoder(other, src.state_dict(), verbose=False)["dropped"]


def test_shape_mismatch_names_key_and_shapes():
    vit = small_vit(patch_size=8)
    with pytest.raises(ValueError, match=r"'patch_embed.proj.weight' has shape \(24, 1, 16, 16, 16\) "
                                         r"but the model expects \(24, 1, 8, 8, 8\)"):
        mv.load_pretrained_encoder(vit, small_mae().state_dict(), verbose=False)


def test_checkpoint_paths(tmp_path):
    mae = small_mae()
    good = tmp_path / "ckpt.pth"
    torch.save({"model": mae.state_dict(), "args": {"lr": 1e-3}}, good)
    report = mv.load_pretrained_encoder(small_vit(), str(good), verbose=False)
    assert "blocks.0.attn.qkv.weight" in report["loaded"]
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": mae.state_dict(), "obj": pickle.PickleError("x")}, unsafe)
    with pytest.raises(ValueError, match="unsafe.pth"):
        mv.load_pretrained_encoder(small_vit(), unsafe, verbose=False)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        mv.load_pretrained_encoder(small_vit(), tmp_path / "missing.pth")


def test_drop_path_and_grad_checkpointing():
    x = torch.rand(2, 1, 32, 32, 32)
    model = small_vit(drop_path_rate=0.5)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.5)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    grads = []
    for ckpt in (False, True):
        net = small_vit(grad_checkpointing=ckpt)
        net(x).sum().backward()
        grads.append(net.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_autocast_backward_finite():
    model = small_vit(global_pool="cat")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 1, 32, 32, 32))
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def analytic_vit_params(e: int, depth: int, num_classes: int = 2) -> int:
    tokens, patch = 4096, 16 ** 3
    return e * patch + e + e + (tokens + 1) * e + depth * (12 * e * e + 13 * e) + 2 * e + e * num_classes + num_classes


@pytest.mark.parametrize("name,e,depth", [("vit_tiny_patch16", 192, 12), ("vit_small_patch16", 384, 12),
                                          ("vit_base_patch16", 768, 12), ("vit_large_patch16", 1024, 24),
                                          ("vit_huge_patch16", 1280, 32)])
def test_vit_factories(name, e, depth):
    with torch.device("meta"):
        model = create_model(name)
    assert model.embed_dim == e and model.depth == depth and model.grid_size == (16, 16, 16)
    assert sum(p.numel() for p in model.parameters()) == analytic_vit_params(e, depth)


@pytest.mark.parametrize("img_size,patch_size", [((32, 64, 64), 16), ((16, 32, 64), (8, 16, 16))])
def test_unetr_output_matches_input_size(img_size, patch_size):
    torch.manual_seed(0)
    model = mv.build_segmentation_model("vit_tiny_patch16", num_classes=3, img_size=img_size,
                                        patch_size=patch_size, feature_size=4, **SMALL).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, *img_size))
    assert out.shape == (1, 3, *img_size)
    assert model.feature_blocks == [0, 1, 2, 3]


def test_unetr_encoder_loads_mae_checkpoint():
    model = mv.build_segmentation_model("vit_tiny_patch16", num_classes=2, img_size=(32, 64, 64),
                                        feature_size=4, **SMALL)
    assert all(k.startswith(("encoder.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "decoder", "out."))
               for k in model.state_dict())
    mae = small_mae(img_size=32)
    report = mv.load_pretrained_encoder(model.encoder, {"model": mae.state_dict()}, verbose=False)
    assert report["missing"] == [] and "norm.weight" in report["loaded"]
    torch.testing.assert_close(model.state_dict()["encoder.blocks.1.attn.qkv.weight"],
                               mae.blocks[1].attn.qkv.weight)


def test_unetr_rejects_bad_requests():
    with pytest.raises(ValueError, match="power-of-two"):
        mv.build_segmentation_model("vit_tiny_patch16", 2, img_size=48, patch_size=12)
    with pytest.raises(ValueError, match="Unknown model .vit_giant."):
        mv.build_segmentation_model("vit_giant", 2, img_size=64)
    assert mv.unetr_strides((8, 16, 4)) == ((2, 2, 1), (1, 2, 4))
