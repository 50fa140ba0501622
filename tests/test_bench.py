"""bench/: the original-compute-path baseline gives our loss and gradients; the benchmark's CPU smoke run works."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import models_mae3d
from bench import bench_pretrain
from bench.baseline_mae3d import BaselineMAE3D, baseline_from, upstream_patchify
from tests.helpers import run_script


def _tiny(img_size, patch_size, norm_pix_loss=False) -> models_mae3d.MaskedAutoencoderViT3D:
    torch.manual_seed(0)
    return models_mae3d.mae_vit_tiny_patch16(img_size=img_size, patch_size=patch_size, depth=2, decoder_depth=1,
                                             norm_pix_loss=norm_pix_loss)


def _loss_and_grads(model, imgs, noise):
    model.zero_grad(set_to_none=True)
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), pred.detach(), mask, grads


@pytest.mark.parametrize("img_size, patch_size, norm_pix_loss", [
    (32, 8, False),
    ((16, 32, 24), 8, False),  # non-cubic grid 2 x 4 x 3: token order must agree with the Conv3d flattening
    (32, (8, 16, 8), True),  # anisotropic patch, normalised-pixel loss (no Sigmoid)
])
def test_baseline_and_ours_give_the_same_loss_pred_and_grads_in_fp32(img_size, patch_size, norm_pix_loss):
    ours = _tiny(img_size, patch_size, norm_pix_loss)
    base = baseline_from(ours)  # the same parameter tensors
    assert isinstance(base, BaselineMAE3D) and base.state_dict().keys() == ours.state_dict().keys()
    assert base.patch_embed.proj.weight is ours.patch_embed.proj.weight
    g = torch.Generator().manual_seed(3)
    imgs = torch.rand(3, 1, *ours.img_size, generator=g)
    noise = torch.rand(3, ours.num_patches, generator=g)

    loss_o, pred_o, mask_o, grads_o = _loss_and_grads(ours, imgs, noise)
    loss_b, pred_b, mask_b, grads_b = _loss_and_grads(base, imgs, noise)
    assert torch.equal(mask_o, mask_b) and int(mask_o.sum()) == 3 * (ours.num_patches - ours.num_patches // 4)
    assert loss_o.dtype == torch.float32 and float(loss_o) > 0
    torch.testing.assert_close(loss_b, loss_o, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pred_b, pred_o, rtol=1e-5, atol=1e-5)
    assert grads_o.keys() == grads_b.keys() and "patch_embed.proj.weight" in grads_o
    for name in grads_o:
        torch.testing.assert_close(grads_b[name], grads_o[name], rtol=1e-4, atol=1e-6, msg=name)


def test_baseline_embeds_every_patch_with_a_convolution_and_ours_only_kept_ones():
    ours = _tiny(32, 8)
    base = baseline_from(ours, share_weights=False)
    assert base.patch_embed.proj.weight is not ours.patch_embed.proj.weight
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), ours.state_dict().values()))
    imgs = torch.rand(2, 1, 32, 32, 32)
    counts = {}
    for name, model in (("ours", ours), ("base", base)):
        with FlopCounterMode(display=False) as fc:
            model(imgs)
        counts[name] = fc.get_flop_counts()["Global"]
    assert torch.ops.aten.convolution in counts["base"] and torch.ops.aten.convolution not in counts["ours"]
    # a stride-equals-kernel Conv3d over all 64 patches costs 4x the matmul over the 16 kept ones
    conv = counts["base"][torch.ops.aten.convolution]
    assert conv == 2 * 2 * 64 * 512 * 192
    assert torch.equal(upstream_patchify(imgs, (8, 8, 8)), ours.patchify(imgs))


def test_quick_benchmark_runs_on_cpu_and_reports_every_variant(tmp_path):
    out = tmp_path / "bench.json"
    # wall time is not asserted (shared CI cores); the subprocess timeout keeps it from hanging
    r = run_script("bench/bench_pretrain.py", "--quick", "--device", "cpu", "--json", out,
                   env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    ref = res["references"][0]
    assert ref["same_mask"] and ref["loss_match"] and ref["loss_abs_diff"] < 1e-2 * ref["loss_baseline"]
    assert 0 < ref["tflop_per_vol"] < ref["baseline_executed_tflop_per_vol"]
    rows = {row["variant"]: row for row in res["results"]}
    assert list(rows) == ["baseline", "eager", "compile", "compile_ckpt"]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["step_ms"] > 0 and row["vol_per_s"] > 0 and row["tflops"] > 0 and row["mfu"] > 0
        assert abs(row["vol_per_s"] - row["batch"] * 1e3 / row["step_ms"]) < 1e-6 * row["vol_per_s"]
        assert row["tflop_per_vol"] == ref["tflop_per_vol"] and 0 < row["loss"] < 1
    assert rows["baseline"]["speedup"] == 1.0 and rows["compile_ckpt"]["batch"] == 2 * rows["eager"]["batch"]
    assert res["matmul_peak_tflops_measured"] > 0
    assert "| config | variant | batch | step ms | vol/s |" in r.stdout
    assert "max abs diff" in r.stdout and "OK" in r.stdout


def test_out_of_memory_marks_the_row_and_the_run_goes_on(monkeypatch):
    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(bench_pretrain, "measure_training", boom)
    args = bench_pretrain.get_args_parser().parse_args(["--quick", "--device", "cpu"])
    device = bench_pretrain.resolve_args(args)
    cfg = bench_pretrain.parse_configs(args.configs)[0]
    rows = [bench_pretrain.run_variant(cfg, v, args, device) for v in ("baseline", "eager", "fp8")]
    assert [r["status"] for r in rows[:2]] == ["OOM", "OOM"]
    assert rows[2]["status"] == "skipped" and ("float8" in rows[2]["note"] or "torchao" in rows[2]["note"])
    bench_pretrain.add_derived(rows, {cfg.name: {"tflop_per_vol": 1e-4}}, peak_tflops=1.0)
    table = bench_pretrain.format_table(rows)
    assert table.count("| OOM |") == 2 and "skipped" in table


def test_config_and_variant_flags_are_parsed_and_bad_ones_refused():
    cfgs = bench_pretrain.parse_configs("large:256:8, base:160:32,tiny:64:4:8")
    assert [(c.model, c.img, c.batch, c.patch) for c in cfgs] == [
        ("mae_vit_large_patch16", 256, 8, 16), ("mae_vit_base_patch16", 160, 32, 16), ("mae_vit_tiny_patch16", 64, 4, 8)]
    assert cfgs[0].num_patches == 4096 and cfgs[0].name == "large/16 256^3 b8"
    for bad in ("giant:256:8", "large:250:8", "large:256", "large:x:8"):
        with pytest.raises(SystemExit, match="SIZE:IMG:BATCH"):
            bench_pretrain.parse_configs(bad)
    assert bench_pretrain.parse_variants("eager,compile", fp8=True) == ["eager", "compile", "fp8"]
    with pytest.raises(SystemExit, match="subset"):
        bench_pretrain.parse_variants("eager,turbo", fp8=False)


def test_a_failing_reference_check_is_reported_and_the_json_follows_every_row(monkeypatch, tmp_path):
    def broken(*a, **k):
        raise RuntimeError("flop counter broke")

    monkeypatch.setattr(bench_pretrain, "count_flops", broken)
    out = tmp_path / "b.json"
    seen = []
    real_write = bench_pretrain.write_json
    monkeypatch.setattr(bench_pretrain, "write_json",
                        lambda path, result: (seen.append(len(result["results"])), real_write(path, result)))
    res = bench_pretrain.main(["--quick", "--device", "cpu", "--variants", "eager,baseline", "--json", str(out)])
    assert "reference check failed (RuntimeError: flop counter broke)" in res["references"][0]["note"]
    assert [r["status"] for r in res["results"]] == ["ok", "ok"] and seen == [1, 2]
    assert json.loads(out.read_text())["results"][1]["variant"] == "baseline"
    budget = bench_pretrain.main(["--quick", "--device", "cpu", "--variants", "eager,baseline", "--budget_s", "1e-3"])
    assert [r["status"] for r in budget["results"]] == ["skipped", "skipped"]
    assert "--budget_s" in budget["results"][0]["note"]
