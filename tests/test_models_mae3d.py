"""MaskedAutoencoderViT3D: TANGERINE keys, masking, loss, patch embedding, bf16, factories."""
import math

import pytest
import torch

from util.nn.registry import create_model
import torch.nn as nn
import torch.nn.functional as F

import models_mae3d as mm
from util.nn.patch_embed import PatchEmbed3D, patchify, unpatchify
from util.nn.pos_embed import get_3d_sincos_pos_embed


def tiny_mae(**kw) -> mm.MaskedAutoencoderViT3D:
    """A very small MAE for CPU tests (kwargs override)."""
    cfg = dict(img_size=32, patch_size=16, embed_dim=24, depth=2, num_heads=2, decoder_embed_dim=16,
               decoder_depth=1, decoder_num_heads=2)
    cfg.update(kw)
    torch.manual_seed(0)
    return mm.mae_vit_tiny_patch16(**cfg)


def block_shapes(prefix: str, e: int) -> dict:
    """timm Block parameter shapes for width e."""
    return {
        f"{prefix}.norm1.weight": (e,), f"{prefix}.norm1.bias": (e,),
        f"{prefix}.attn.qkv.weight": (3 * e, e), f"{prefix}.attn.qkv.bias": (3 * e,),
        f"{prefix}.attn.proj.weight": (e, e), f"{prefix}.attn.proj.bias": (e,),
        f"{prefix}.norm2.weight": (e,), f"{prefix}.norm2.bias": (e,),
        f"{prefix}.mlp.fc1.weight": (4 * e, e), f"{prefix}.mlp.fc1.bias": (4 * e,),
        f"{prefix}.mlp.fc2.weight": (e, 4 * e), f"{prefix}.mlp.fc2.bias": (e,),
    }


def tangerine_shapes() -> dict:
    """Key -> shape list written from the README's "Model contract" section."""
    e, d = 1024, 512
    shapes = {"cls_token": (1, 1, e), "pos_embed": (1, 4097, e),
              "patch_embed.proj.weight": (e, 1, 16, 16, 16), "patch_embed.proj.bias": (e,),
              "norm.weight": (e,), "norm.bias": (e,),
              "decoder_embed.weight": (d, e), "decoder_embed.bias": (d,), "mask_token": (1, 1, d),
              "decoder_pos_embed": (1, 4097, d), "decoder_norm.weight": (d,), "decoder_norm.bias": (d,),
              "decoder_pred.0.weight": (4096, d), "decoder_pred.0.bias": (4096,)}
    for i in range(24):
        shapes.update(block_shapes(f"blocks.{i}", e))
    for i in range(8):
        shapes.update(block_shapes(f"decoder_blocks.{i}", d))
    return shapes


@pytest.fixture(scope="module")
def large_meta() -> mm.MaskedAutoencoderViT3D:
    with torch.device("meta"):
        return mm.mae_vit_large_patch16()


def test_large_state_dict_matches_tangerine(large_meta):
    got = {k: tuple(v.shape) for k, v in large_meta.state_dict().items()}
    expected = tangerine_shapes()
    assert set(got) == set(expected), (set(got) ^ set(expected))
    assert got == expected
    assert not large_meta.pos_embed.requires_grad and not large_meta.decoder_pos_embed.requires_grad
    assert isinstance(large_meta.decoder_pred[1], nn.Sigmoid)
    assert large_meta.blocks[0].norm1.eps == 1e-6 and large_meta.blocks[0].attn.fused_attn


def test_module_prefixed_checkpoint_loads_strict(large_meta, tmp_path):
    from util.task.record import CheckpointRecord, read_record

    ckpt = {"model": {f"module.{k}": v for k, v in large_meta.state_dict().items()}}
    with torch.device("meta"):
        fresh = mm.mae_vit_large_patch16()
    fresh.load_state_dict(CheckpointRecord.from_dict(ckpt).weights, strict=True)
    # the same on real tensors through a file, in every container TANGERINE users have: values survive
    src = tiny_mae()
    for container in ("model", "state_dict", "model_state", None):
        weights = {f"module.{k}": v for k, v in src.state_dict().items()}
        torch.save(weights if container is None else {container: weights}, tmp_path / "w.pth")
        dst = tiny_mae(norm_pix_loss=True)
        dst.load_state_dict(read_record(tmp_path / "w.pth").weights, strict=True)
        assert torch.equal(dst.decoder_pred[0].weight, src.decoder_pred[0].weight), container


def analytic_params(e, depth, de, ddepth, img=256, patch=16, c=1) -> int:
    """Parameter count of an MAE written out by hand (fixed tables included)."""
    length, p = (img // patch) ** 3, patch ** 3 * c
    block = lambda w: 12 * w * w + 13 * w  # noqa: E731
    encoder = e * p + e + e + (length + 1) * e + depth * block(e) + 2 * e
    decoder = e * de + de + de + (length + 1) * de + ddepth * block(de) + 2 * de + de * p + p
    return encoder + decoder


@pytest.mark.parametrize("name,dims", [
    ("mae_vit_tiny_patch16", (192, 12, 128, 4)), ("mae_vit_small_patch16", (384, 12, 256, 4)),
    ("mae_vit_base_patch16", (768, 12, 512, 8)), ("mae_vit_large_patch16", (1024, 24, 512, 8)),
    ("mae_vit_huge_patch16", (1280, 32, 512, 8))])
def test_factories_build_at_256_with_expected_sizes(name, dims):
    with torch.device("meta"):
        model = create_model(name)
    assert model.img_size == (256, 256, 256) and model.num_patches == 4096
    assert sum(p.numel() for p in model.parameters()) == analytic_params(*dims)


def test_factory_kwargs_override_everything():
    model = mm.mae_vit_tiny_patch16(img_size=(32, 64, 64), patch_size=(8, 16, 16), in_chans=2,
                                    depth=1, decoder_depth=1, decoder_embed_dim=32, norm_pix_loss=True)
    assert model.grid_size == (4, 4, 4) and len(model.blocks) == 1 and len(model.decoder_blocks) == 1
    assert model.decoder_pred[0].weight.shape == (8 * 16 * 16 * 2, 32)
    with pytest.raises(ValueError, match="divisible"):
        mm.mae_vit_tiny_patch16(img_size=(40, 64, 64))


def test_patchify_order_and_round_trip():
    imgs = torch.randn(2, 2, 8, 12, 8)
    patch = (2, 4, 2)
    x = patchify(imgs, patch)
    assert x.shape == (2, 4 * 3 * 4, 2 * 4 * 2 * 2)
    d, h, w, i, j, k, c = 3, 1, 2, 1, 3, 0, 1  # one voxel by hand
    token = d * 3 * 4 + h * 4 + w
    col = ((i * 4 + j) * 2 + k) * 2 + c
    assert x[1, token, col] == imgs[1, c, d * 2 + i, h * 4 + j, w * 2 + k]
    assert torch.equal(unpatchify(x, patch, (4, 3, 4), 2), imgs)
    model = tiny_mae(img_size=(16, 32, 32), patch_size=(8, 16, 16), in_chans=2)
    vol = torch.rand(1, 2, 16, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(vol)), vol)


def test_patch_embed_equals_conv3d():
    torch.manual_seed(0)
    pe = PatchEmbed3D((16, 32, 24), (4, 8, 8), in_chans=2, embed_dim=10)
    x = torch.randn(3, 2, 16, 32, 24)
    conv = F.conv3d(x, pe.proj.weight, pe.proj.bias, stride=pe.patch_size).flatten(2).transpose(1, 2)
    assert pe.grid_size == (4, 4, 3) and pe.num_patches == 48
    torch.testing.assert_close(pe(x), conv, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected input \[N, 2, 16, 32, 24\]"):
        pe(torch.randn(1, 2, 16, 32, 32))


@pytest.mark.parametrize("img_size,patch_size,patch_dim", [(32, 16, 4096), ((16, 32, 32), (8, 16, 16), 2048)])
def test_forward_shapes(img_size, patch_size, patch_dim):
    model = tiny_mae(img_size=img_size, patch_size=patch_size)
    shape = (img_size,) * 3 if isinstance(img_size, int) else img_size
    loss, pred, mask = model(torch.rand(2, 1, *shape), mask_ratio=0.75)
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert pred.shape == (2, 8, patch_dim) and mask.shape == (2, 8)
    assert ((pred >= 0) & (pred <= 1)).all()  # Sigmoid head


def test_anisotropic_large_volume_shapes_on_meta():
    with torch.device("meta"):
        model = mm.mae_vit_tiny_patch16(img_size=(128, 256, 256), patch_size=(8, 16, 16))
        loss, pred, mask = model(torch.rand(1, 1, 128, 256, 256))
    assert model.grid_size == (16, 16, 16)
    assert pred.shape == (1, 4096, 2048) and mask.shape == (1, 4096) and loss.shape == ()


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_keeps_exactly_int_of_tokens(ratio):
    model = tiny_mae(img_size=48)  # L = 27
    latent, mask, ids_restore = model.forward_encoder(torch.rand(2, 1, 48, 48, 48), ratio)
    keep = int(27 * (1 - ratio))
    assert latent.shape == (2, 1 + keep, 24)
    assert mask.sum(dim=1).tolist() == [27 - keep] * 2
    assert sorted(ids_restore[0].tolist()) == list(range(27))


def test_noise_decides_mask_and_output():
    model = tiny_mae(img_size=48).eval()
    imgs = torch.rand(2, 1, 48, 48, 48)
    noise = torch.rand(2, 27)
    loss1, pred1, mask1 = model(imgs, 0.75, noise=noise)
    loss2, pred2, mask2 = model(imgs, 0.75, noise=noise.clone())
    kept = noise.argsort(dim=1)[:, :6]
    expected = torch.ones(2, 27).scatter_(1, kept, 0.0)
    assert torch.equal(mask1, expected) and torch.equal(mask1, mask2)
    assert torch.equal(pred1, pred2) and loss1 == loss2
    with pytest.raises(ValueError, match="noise must have shape"):
        model(imgs, 0.75, noise=torch.rand(2, 26))
    with pytest.raises(ValueError, match="mask_ratio"):
        model(imgs, 1.0)


def test_encoder_embeds_kept_patches_like_full_conv():
    model = tiny_mae(img_size=48).eval()
    imgs, noise = torch.rand(2, 1, 48, 48, 48), torch.rand(2, 27)
    latent, _, _ = model.forward_encoder(imgs, 0.75, noise)
    full = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    kept, _, _ = model.random_masking(full, 0.75, noise)
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), kept], dim=1)
    for blk in model.blocks:
        x = blk(x)
    torch.testing.assert_close(latent, model.norm(x), rtol=1e-5, atol=1e-5)


def test_loss_counts_only_removed_patches():
    model = tiny_mae(img_size=48)
    imgs = torch.rand(2, 1, 48, 48, 48)
    _, pred, mask = model(imgs, 0.75)
    pred = pred.detach()
    base = model.forward_loss(imgs, pred, mask)
    target = model.patchify(imgs)
    by_hand = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(base, by_hand)
    kept = (mask == 0).unsqueeze(-1)
    assert model.forward_loss(imgs, torch.where(kept, pred + 5.0, pred), mask) == base
    assert model.forward_loss(imgs, torch.where(~kept, pred + 0.1, pred), mask) != base


def test_norm_pix_loss_has_no_sigmoid_and_other_loss():
    plain, norm = tiny_mae(img_size=48), tiny_mae(img_size=48, norm_pix_loss=True)
    assert len(norm.decoder_pred) == 1 and isinstance(norm.decoder_pred[0], nn.Linear)
    norm.load_state_dict(plain.state_dict(), strict=True)  # same keys: decoder_pred.0.*
    imgs, noise = torch.rand(2, 1, 48, 48, 48), torch.rand(2, 27)
    loss_plain, pred_plain, _ = plain(imgs, 0.75, noise)
    loss_norm, pred_norm, mask = norm(imgs, 0.75, noise)
    torch.testing.assert_close(torch.sigmoid(pred_norm), pred_plain)
    assert not torch.isclose(loss_plain, loss_norm)
    target = norm.patchify(imgs)
    model_target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert norm.forward_loss(imgs, model_target, mask) < 1e-10


def test_bf16_autocast_forward_backward_finite():
    model = tiny_mae(img_size=32, grad_checkpointing=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = model(torch.rand(2, 1, 32, 32, 32), 0.5)
    assert loss.dtype == torch.float32 and pred.dtype == torch.bfloat16
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.pos_embed.grad is None and model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_grad_checkpointing_gives_same_gradients():
    imgs, noise = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 8)
    grads = []
    for ckpt in (False, True):
        model = tiny_mae(img_size=32)
        model.set_grad_checkpointing(ckpt)
        model(imgs, 0.5, noise)[0].backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_init_like_mae():
    model = tiny_mae(img_size=32, embed_dim=192, num_heads=3)
    assert torch.equal(model.pos_embed[0], torch.from_numpy(get_3d_sincos_pos_embed(192, 2, cls_token=True)))
    w = model.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (w.shape[0] + w[0].numel()))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert 0.01 < model.cls_token.std() < 0.03
    assert torch.all(model.blocks[0].norm1.weight == 1) and torch.all(model.blocks[0].norm1.bias == 0)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert model.no_weight_decay() == {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed"}
