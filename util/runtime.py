"""Process-level settings shared by every script: CPU count, threads, loader workers, precision, seeds."""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

# torch and numpy are imported inside the functions that need them: the scripts' parsers (--help) use this module


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank among `world_size` processes (torchrun), its GPU index on the machine
    (`local_rank`) and its device ('cuda:N' or 'cpu')."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM or cgroup allocation)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_num_workers(per_process: int = 8) -> int:
    """DataLoader workers per process: `per_process`, but never more than the CPUs this process may use
    divided among the processes of this machine (torchrun's LOCAL_WORLD_SIZE), leaving one for the main process."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(per_process, available_cpus() // local - 1))


def torch_threads() -> None:
    """Honour OMP_NUM_THREADS for torch's intra-op pool, so processes sharing a machine do not oversubscribe it."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> bf16 on GPUs that support it (fp16 on older ones), fp32 on CPU; fp16 on CPU falls back to fp32."""
    import torch

    if precision != "auto":
        if precision == "fp16" and not device.startswith("cuda"):
            print("fp16 needs CUDA: using fp32 on CPU.")
            return "fp32"
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(precision: str, device: str):
    """The autocast context of a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The seed of one training step: every random choice of a step (mask, drop path) derives from it, so a run
    resumed at any step replays the uninterrupted one exactly."""
    return (seed * 1_000_003 + epoch * 100_019 + step * 1_009 + rank * 7) % (2 ** 63)
