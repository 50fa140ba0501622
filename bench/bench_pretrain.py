"""Pretraining-step benchmark: the original 3D-MAE compute path against ours (eager, per-block compile, + checkpointing).
Timing and device helpers live in bench/gpu_timing.py.

    python bench/bench_pretrain.py --json bench_h100.json     # GPU: ViT-L/16 256^3 b8, b32; ViT-B/16 160^3 b32
    python bench/bench_pretrain.py --quick                    # seconds, CPU allowed: tiny model 32^3 (smoke test)

For every config and variant it times full training steps (autocast, forward, backward, AdamW step, zero_grad) and
reports volumes/s, step time, peak memory, model TFLOP per volume, achieved TFLOP/s, MFU against a bf16 matmul peak
measured in the same run, and the speed-up over the baseline. See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import models_mae3d  # noqa: E402, F401  (registers the MAE factories)
from util.nn.registry import create_model, model_names  # noqa: E402
from bench.baseline_mae3d import baseline_from  # noqa: E402
from bench.gpu_timing import (apply_fp8, fp8_skip_reason, is_oom, matmul_peak_tflops, release, sync,  # noqa: E402
                              timed)
from util.runtime import autocast, torch_threads  # noqa: E402
from util.train.lr_decay import param_groups_weight_decay  # noqa: E402

DEFAULT_CONFIGS = "large:256:8,large:256:32"
QUICK_CONFIGS = "tiny:32:2:8"
QUICK_MODEL_KW = dict(depth=2, decoder_depth=1)  # ViT-Ti widths, 2 encoder + 1 decoder blocks
VARIANTS = ("baseline", "eager", "compile", "compile_ckpt", "fp8")
COMPILED = ("compile", "compile_ckpt", "fp8")
GIB = 2 ** 30


@dataclass
class Config:
    """One benchmark setting: model size name, cubic input size, per-GPU batch, patch size."""
    size: str
    img: int
    batch: int
    patch: int = 16

    @property
    def model(self) -> str:
        return f"mae_vit_{self.size}_patch16"

    @property
    def name(self) -> str:
        return f"{self.size}/{self.patch} {self.img}^3 b{self.batch}"

    @property
    def num_patches(self) -> int:
        return (self.img // self.patch) ** 3


def parse_configs(spec: str) -> list[Config]:
    """'large:256:8,base:160:32' (SIZE:IMG:BATCH[:PATCH]) -> configs; one-sentence SystemExit on a bad item."""
    configs = []
    for item in (s.strip() for s in spec.split(",")):
        parts = item.split(":")
        try:
            cfg = Config(parts[0], *(int(p) for p in parts[1:])) if 3 <= len(parts) <= 4 else None
        except ValueError:
            cfg = None
        if (cfg is None or cfg.model not in model_names("mae") or min(cfg.img, cfg.batch, cfg.patch) < 1
                or cfg.img % cfg.patch):
            raise SystemExit(f"--configs item '{item}' must be SIZE:IMG:BATCH[:PATCH] with SIZE one of tiny, small, "
                             f"base, large, huge and IMG a multiple of PATCH (e.g. large:256:8).")
        configs.append(cfg)
    return configs


def parse_variants(spec: str, fp8: bool) -> list[str]:
    """Comma-separated subset of VARIANTS (order kept); --fp8 appends the fp8 variant."""
    variants = [v.strip() for v in spec.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise SystemExit(f"--variants {spec!r} must be a comma-separated subset of {', '.join(VARIANTS)}.")
    return variants + (["fp8"] if fp8 and "fp8" not in variants else [])


def build(cfg: Config, variant: str, args, device: torch.device) -> torch.nn.Module:
    """The model of one variant, on `device`, with the same seeded weights for every variant."""
    kw = dict(img_size=cfg.img, patch_size=cfg.patch, **(QUICK_MODEL_KW if args.quick else {}))
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = create_model(cfg.model, **kw)
    if variant == "baseline":
        return baseline_from(model)
    if variant == "fp8":
        apply_fp8(model)
    if variant in COMPILED:
        torch._dynamo.reset()  # every compiled variant pays (and reports) its own compile time
        for blk in [*model.blocks, *model.decoder_blocks]:  # as main_pretrain.py --compile (static shapes)
            blk.compile(backend=args.compile_backend, dynamic=None if args.dynamic_shapes else False)
    if variant == "compile_ckpt":
        model.set_grad_checkpointing(True)
    return model


def measure_training(cfg: Config, variant: str, batch: int, args, device: torch.device) -> dict:
    """Warm-up then timed training steps of one variant; returns step_ms, warmup_s, loss and (GPU) memory."""
    model = build(cfg, variant, args, device)
    groups = param_groups_weight_decay(model, 0.05, model.no_weight_decay())
    opt = torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    imgs = torch.rand(batch, 1, cfg.img, cfg.img, cfg.img, device=device)
    last = {}

    def step() -> None:
        with autocast(args.precision, device.type):
            loss = model(imgs, mask_ratio=args.mask_ratio)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = loss.detach()

    t0 = time.perf_counter()
    for _ in range(args.warmup):  # includes compilation and optimizer-state allocation
        step()
    sync(device)
    out = {"warmup_s": time.perf_counter() - t0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        static = torch.cuda.memory_allocated(device)  # weights + AdamW state
    out["step_ms"] = timed(step, args.steps, device)
    out["loss"] = float(last["loss"])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_gib=peak / GIB, gib_per_vol=peak / GIB / batch, act_gib_per_vol=(peak - static) / GIB / batch)
    return out


def run_variant(cfg: Config, variant: str, args, device: torch.device) -> dict:
    """One table row; status is ok, OOM, skipped or error (the run goes on either way)."""
    batch = cfg.batch * (args.ckpt_batch_mult if variant == "compile_ckpt" else 1)
    row = dict(config=cfg.name, variant=variant, batch=batch, status="ok", note="")
    reason = fp8_skip_reason(device) if variant == "fp8" else None
    if reason:
        return row | dict(status="skipped", note=reason)
    try:
        row.update(measure_training(cfg, variant, batch, args, device))
    except Exception as e:  # noqa: BLE001 - one failing variant must not end the benchmark
        if is_oom(e):
            row.update(status="OOM")
        else:
            traceback.print_exc()
            row.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    release(device)
    return row


def count_flops(model: torch.nn.Module, cfg: Config, args, device: torch.device) -> float:
    """FLOPs of one forward + backward of one volume (torch.utils.flop_counter)."""
    imgs = torch.rand(1, 1, cfg.img, cfg.img, cfg.img, device=device)
    with FlopCounterMode(display=False) as counter:
        with autocast(args.precision, device.type):
            loss = model(imgs, mask_ratio=args.mask_ratio)[0]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def compare_losses(ours: torch.nn.Module, base: torch.nn.Module, cfg: Config, args, device: torch.device) -> dict:
    """Loss of ours and of the baseline (shared weights) on the same batch and noise, under the benchmark precision."""
    g = torch.Generator().manual_seed(args.seed + 1)
    imgs = torch.rand(cfg.batch, 1, cfg.img, cfg.img, cfg.img, generator=g).to(device)
    noise = torch.rand(cfg.batch, cfg.num_patches, generator=g).to(device)
    with torch.no_grad(), autocast(args.precision, device.type):
        loss_o, pred_o, mask_o = ours(imgs, mask_ratio=args.mask_ratio, noise=noise)
        loss_b, pred_b, mask_b = base(imgs, mask_ratio=args.mask_ratio, noise=noise)
    diff = abs(float(loss_o) - float(loss_b))
    # bf16 keeps ~3 significant digits; fp32 on GPU lets cuDNN run the baseline's Conv3d in TF32
    rtol = 2e-2 if args.precision == "bf16" else (1e-3 if device.type == "cuda" else 1e-5)
    return dict(loss_ours=float(loss_o), loss_baseline=float(loss_b), loss_abs_diff=diff,
                pred_max_abs_diff=float((pred_o.float() - pred_b.float()).abs().max()),
                same_mask=bool(torch.equal(mask_o, mask_b)),
                loss_match=bool(torch.equal(mask_o, mask_b) and diff <= rtol * abs(float(loss_b)) + 1e-6))


def reference_checks(cfg: Config, args, device: torch.device) -> dict:
    """Model TFLOP per volume (ours; also what the baseline executes) and the ours-vs-baseline loss check."""
    out = dict(config=cfg.name, tflop_per_vol=None, note="")
    try:
        model = build(cfg, "eager", args, device)
        base = baseline_from(model)  # same parameter tensors, original forward
        out["tflop_per_vol"] = count_flops(model, cfg, args, device) / 1e12
        out["baseline_executed_tflop_per_vol"] = count_flops(base, cfg, args, device) / 1e12
        out.update(compare_losses(model, base, cfg, args, device))
    except Exception as e:  # noqa: BLE001 - reported, and the timing rows still run
        out["note"] = ("OOM during FLOP count / loss check" if is_oom(e) else
                       f"reference check failed ({type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''})")
    release(device)
    return out


def add_derived(rows: list[dict], refs: dict[str, dict], peak_tflops: float) -> None:
    """vol/s, TFLOP/vol, achieved TFLOP/s, MFU and speed-up vs the same config's baseline row."""
    base_vps = {r["config"]: r["batch"] * 1e3 / r["step_ms"] for r in rows
                if r["variant"] == "baseline" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        r["vol_per_s"] = r["batch"] * 1e3 / r["step_ms"]
        tflop = refs[r["config"]].get("tflop_per_vol")
        if tflop:
            r["tflop_per_vol"] = tflop
            r["tflops"] = tflop * r["vol_per_s"]
            r["mfu"] = r["tflops"] / peak_tflops
        if r["config"] in base_vps:
            r["speedup"] = r["vol_per_s"] / base_vps[r["config"]]


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    """Markdown table of all rows; OOM / skipped / error rows keep their status in the vol/s column."""
    head = ["config", "variant", "batch", "step ms", "vol/s", "peak GiB", "GiB/vol", "TFLOP/vol", "TFLOP/s", "MFU",
            "vs baseline", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        g = r.get
        ok = r["status"] == "ok"
        cells = [r["config"], r["variant"], str(r["batch"]), _f(g("step_ms"), ".1f"),
                 _f(g("vol_per_s"), ".2f") if ok else r["status"], _f(g("peak_gib"), ".1f"),
                 _f(g("gib_per_vol"), ".2f"), _f(g("tflop_per_vol"), ".3g"), _f(g("tflops"), ".3g"),
                 _f(None if g("mfu") is None else 100 * g("mfu"), ".1f") + ("%" if g("mfu") is not None else ""),
                 _f(g("speedup"), ".2f") + ("x" if g("speedup") is not None else ""), r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("3D MAE pretraining-step benchmark", add_help=True)
    p.add_argument("--configs", default=None, help=f"SIZE:IMG:BATCH[:PATCH],... (default {DEFAULT_CONFIGS})")
    p.add_argument("--variants", default="baseline,eager,compile,compile_ckpt",
                   help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--fp8", action="store_true", help="add the torchao float8 variant (skipped with a note if absent)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, >= 1 (default 5; 1 with --quick)")
    p.add_argument("--ckpt_batch_mult", type=int, default=2, help="batch multiplier of the compile_ckpt variant")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast dtype (and matmul peak)")
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--compile_backend", default=None, help="torch.compile backend (default inductor; "
                                                           "aot_eager with --quick on CPU)")
    p.add_argument("--dynamic_shapes", action="store_true", help="blk.compile(dynamic=None) (Dynamo may mark sequence "
                                                                 "lengths dynamic) instead of static shapes")
    p.add_argument("--budget_s", type=float, default=None, help="skip the rows that would end after this many seconds "
                                                                "(estimated from the rows measured so far)")
    p.add_argument("--matmul_size", type=int, default=None, help="n of the n^3 peak matmul (default 8192; 256 quick)")
    p.add_argument("--peak_tflops", type=float, default=None, help="MFU denominator instead of the measured peak "
                                                                   "(e.g. 989 for the H100 SXM bf16 datasheet)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_CONFIGS}, 2 steps, CPU allowed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write all results as JSON")
    return p


def resolve_args(args) -> torch.device:
    """Fill defaults that depend on --quick and the device; returns the device."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device} asked for CUDA but torch sees no GPU; use --device cpu --quick.")
        if device.index is not None:
            torch.cuda.set_device(device)
    if device.type == "cpu" and not args.quick and args.configs is None:
        raise SystemExit("The default configs (ViT-L 256^3) need a GPU: on CPU pass --quick or small --configs.")
    torch_threads()  # honours OMP_NUM_THREADS
    if device.type == "cpu" and args.quick and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny ops: thread barriers on a busy machine cost more than they save
    args.configs = args.configs or (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    args.steps = args.steps or (2 if args.quick else 20)
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if args.quick else 5))
    args.matmul_size = args.matmul_size or (256 if args.quick else 8192)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.quick and device.type == "cpu" else "inductor")
    return device


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / GIB:.0f} GiB, sm_{p.major}{p.minor})"
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    device = resolve_args(args)
    configs, variants = parse_configs(args.configs), parse_variants(args.variants, args.fp8)
    torch.backends.cudnn.benchmark = True  # best conv algorithm for the baseline's Conv3d
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    measured = matmul_peak_tflops(device, dtype, args.matmul_size)
    peak = args.peak_tflops or measured
    print(f"device: {describe(device)}, torch {torch.__version__}, precision {args.precision}, "
          f"compile backend {args.compile_backend}")
    print(f"{args.precision} matmul peak: {measured:.4g} TFLOP/s measured (n={args.matmul_size}); MFU denominator "
          f"{peak:.4g} TFLOP/s" + (" (CPU smoke run: throughput and MFU are not meaningful)" if device.type == "cpu"
                                   else ""), flush=True)
    refs, rows, t0 = {}, [], time.perf_counter()
    result = dict(device=describe(device), torch=torch.__version__, precision=args.precision,
                  matmul_peak_tflops_measured=measured, mfu_peak_tflops=peak, references=[], results=rows,
                  args=vars(args))
    for cfg in configs:
        ref = refs[cfg.name] = reference_checks(cfg, args, device)
        result["references"] = list(refs.values())
        if "loss_ours" in ref:
            print(f"[{cfg.name}] loss ours {ref['loss_ours']:.6f} baseline {ref['loss_baseline']:.6f} max abs diff "
                  f"{ref['loss_abs_diff']:.2e} (pred max abs diff {ref['pred_max_abs_diff']:.2e}, same mask "
                  f"{ref['same_mask']}): {'OK' if ref['loss_match'] else 'MISMATCH'}; model "
                  f"{ref['tflop_per_vol']:.4g} TFLOP/vol fwd+bwd (baseline executes "
                  f"{ref['baseline_executed_tflop_per_vol']:.4g})", flush=True)
        else:
            print(f"[{cfg.name}] {ref['note']}", flush=True)
        for variant in variants:
            if over_budget(args, rows, t0):
                rows.append(dict(config=cfg.name, variant=variant, batch=cfg.batch, status="skipped",
                                 note=f"--budget_s {args.budget_s:g} reached"))
            else:
                rows.append(run_variant(cfg, variant, args, device))
            r = rows[-1]
            r["elapsed_s"] = time.perf_counter() - t0
            print(f"[{cfg.name}] {variant:<12} batch {r['batch']:>3}: {r['status']} "
                  f"{_f(r.get('step_ms'), '.1f')} ms/step, warm-up {_f(r.get('warmup_s'), '.1f')} s {r['note']}",
                  flush=True)
            add_derived(rows, refs, peak)
            write_json(args.json, result)  # a run cut short keeps every row it measured
    print()
    print(format_table(rows))
    if args.json:
        print(f"results written to {args.json}")
    return result


def over_budget(args, rows: list[dict], t0: float) -> bool:
    """True when the next row would probably end after --budget_s (the longest row so far as the estimate)."""
    if not args.budget_s:
        return False
    spent = [r["elapsed_s"] - (rows[i - 1]["elapsed_s"] if i else 0.0) for i, r in enumerate(rows)]
    return time.perf_counter() - t0 + (max(spent) if spent else 0.0) > args.budget_s


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)


if __name__ == "__main__":
    main()
