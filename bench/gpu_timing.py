"""Device-side measurement for the benchmarks: synchronised timing, the bf16 matmul peak, float8 availability,
out-of-memory detection and memory release. No model code here."""
from __future__ import annotations

import gc
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Milliseconds per call of fn over n back-to-back calls (CUDA events on GPU, perf_counter on CPU)."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3 / n


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 20, trials: int = 5) -> float:
    """Best-of-`trials` TFLOP/s of an [n, n] x [n, n] matmul in `dtype`, repeated `reps` times per trial."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty_like(a)
    fn = lambda: torch.matmul(a, b, out=out)  # noqa: E731
    timed(fn, 3, device)
    best_ms = min(timed(fn, reps, device) for _ in range(trials))
    return 2 * n ** 3 / (best_ms * 1e-3) / 1e12


def fp8_skip_reason(device: torch.device) -> str | None:
    """Why the float8 variant cannot run here, or None when it can."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "skipped: torchao is not installed (pip install torchao)"
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return "skipped: float8 needs a CUDA GPU with compute capability >= 8.9 (e.g. H100)"
    return None


def apply_fp8(model: torch.nn.Module) -> None:
    """torchao float8 training (dynamic tensorwise scaling) on the Linear layers of encoder and decoder blocks."""
    from torchao.float8 import convert_to_float8_training

    def block_linear(mod: torch.nn.Module, fqn: str) -> bool:
        return (isinstance(mod, torch.nn.Linear) and "blocks." in fqn
                and mod.in_features % 16 == 0 and mod.out_features % 16 == 0)

    convert_to_float8_training(model, module_filter_fn=block_linear)


def is_oom(e: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(e, oom_type) or "out of memory" in str(e).lower()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
