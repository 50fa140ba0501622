"""Layer-wise lr decay groups and the warmup + cosine schedule."""
import math

import pytest
import torch
import torch.nn as nn

from util.train.lr_decay import param_groups_lrd, param_groups_weight_decay
from util.train.lr_sched import adjust_learning_rate
from util.train.settings import Schedule


class TinyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)


class TinyViT(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 3):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim), requires_grad=False)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(1, dim, 2, stride=2)
        self.blocks = nn.ModuleList([TinyBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)


class TinyUNETR(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = TinyViT()
        self.decoder = nn.Conv3d(8, 3, 1)


def _lookup(model: nn.Module, groups: list[dict]) -> dict[str, dict]:
    """Parameter name -> the group that holds it."""
    by_id = {id(p): g for g in groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


@pytest.mark.parametrize("nested", [False, True])
def test_layer_decay_scales_and_no_decay(nested):
    model = TinyUNETR() if nested else TinyViT()
    pre = "encoder." if nested else ""
    decay, wd = 0.5, 0.05
    groups = param_groups_lrd(model, weight_decay=wd, layer_decay=decay)
    g = _lookup(model, groups)
    num_layers = 3 + 1
    expected_ids = {f"{pre}cls_token": 0, f"{pre}patch_embed.proj.weight": 0, f"{pre}blocks.0.fc.weight": 1,
                    f"{pre}blocks.2.norm1.weight": 3, f"{pre}norm.weight": 4, f"{pre}head.weight": 4}
    if nested:
        expected_ids["decoder.weight"] = 4
    for name, layer_id in expected_ids.items():
        assert g[name]["lr_scale"] == pytest.approx(decay ** (num_layers - layer_id)), name
    assert g[f"{pre}head.weight"]["lr_scale"] == 1.0
    assert f"{pre}pos_embed" not in g  # frozen: skipped
    for name in (f"{pre}cls_token", f"{pre}head.bias", f"{pre}norm.weight", f"{pre}blocks.1.norm1.weight",
                 f"{pre}patch_embed.proj.bias"):
        assert g[name]["weight_decay"] == 0.0, name
    for name in (f"{pre}head.weight", f"{pre}blocks.1.fc.weight", f"{pre}patch_embed.proj.weight"):
        assert g[name]["weight_decay"] == wd, name
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(gr["params"]) for gr in groups) == n_trainable


def test_no_weight_decay_list_and_missing_blocks():
    model = TinyViT()
    g = _lookup(model, param_groups_lrd(model, no_weight_decay_list={"head.weight"}))
    assert g["head.weight"]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="blocks"):
        param_groups_lrd(nn.Linear(2, 2))


def test_param_groups_weight_decay_two_groups():
    model = TinyViT()
    model.mask_token = nn.Parameter(torch.zeros(1, 1, 8))
    groups = param_groups_weight_decay(model, 0.05)
    assert [gr["weight_decay"] for gr in groups] == [0.0, 0.05]
    g = _lookup(model, groups)
    for name in ("cls_token", "mask_token", "norm.weight", "head.bias", "blocks.0.norm1.bias"):
        assert g[name]["weight_decay"] == 0.0, name
    assert g["head.weight"]["weight_decay"] == 0.05 and g["blocks.0.fc.weight"]["weight_decay"] == 0.05
    assert "pos_embed" not in g


class _FakeOptimizer:
    """Only `param_groups` is used by the schedule (building a torch optimizer costs seconds on first use)."""

    def __init__(self, param_groups: list[dict]):
        self.param_groups = param_groups


def test_schedule_warmup_then_cosine():
    args = Schedule(lr=1e-3, min_lr=1e-5, warmup_epochs=2, epochs=10)
    opt = _FakeOptimizer([{"params": [], "lr_scale": 0.5}])
    assert adjust_learning_rate(opt, 0.0, args) == 0.0
    assert adjust_learning_rate(opt, 1.0, args) == pytest.approx(5e-4)
    assert adjust_learning_rate(opt, 2.0, args) == pytest.approx(1e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)  # lr_scale applied
    assert adjust_learning_rate(opt, 10.0, args) == pytest.approx(1e-5)
    assert adjust_learning_rate(opt, 6.0, args) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    lrs = [adjust_learning_rate(opt, 2.0 + i * 0.1, args) for i in range(81)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(1e-5)


def test_schedule_without_warmup():
    args = Schedule(lr=2e-3, warmup_epochs=0, epochs=4)
    opt = _FakeOptimizer([{"params": []}])
    assert adjust_learning_rate(opt, 0.0, args) == pytest.approx(2e-3)
    assert adjust_learning_rate(opt, 4.0, args) == pytest.approx(0.0, abs=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert not math.isnan(adjust_learning_rate(opt, 5.0, args))


def test_the_warmup_is_maes_and_a_too_long_warmup_is_fitted_to_a_short_run():
    from util.train.settings import fit_warmup

    args = Schedule(lr=1e-3, min_lr=0.0, warmup_epochs=2, epochs=10)
    opt = _FakeOptimizer([{"params": []}])
    steps = 4  # optimizer steps per epoch
    lrs = [adjust_learning_rate(opt, i / steps, args) for i in range(10 * steps)]
    for i in range(2 * steps):  # MAE's warmup exactly: lr x epoch / warmup (the first step at 0)
        assert lrs[i] == pytest.approx(1e-3 * (i / steps) / 2, abs=1e-15)
    assert lrs[2 * steps] == pytest.approx(1e-3)  # the peak
    assert min(lrs[1:]) > 0 and all(a < b for a, b in zip(lrs[:8], lrs[1:8]))
    assert fit_warmup(5, 50) == (5, None)
    warmup, line = fit_warmup(40, 1)  # the smoke run `--epochs 1` with the pretraining recipe's warmup
    assert warmup == 0.5 and "--warmup_epochs 40" in line and "--epochs 1" in line and "0.5 epochs" in line
    short = Schedule(lr=1e-3, min_lr=0.0, warmup_epochs=warmup, epochs=1)
    lrs = [adjust_learning_rate(opt, i / 8, short) for i in range(8)]
    # without the fit every step stayed below 1/40 of the peak; now the run reaches it and decays
    assert max(lrs) == pytest.approx(1e-3) and min(lrs[1:]) > 1e-4
