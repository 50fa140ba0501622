"""Helpers for the end-to-end tests: run the scripts as a user would, on small data."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args, cwd=None, env=None, timeout=600, torchrun: int = 0) -> subprocess.CompletedProcess:
    """Run `script` (e.g. 'main_pretrain.py') with `args` in a fresh Python, as the user would."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.pop("MAE3D_FAULT", None)
    full_env.update(env or {})
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    else:
        cmd = [sys.executable]
    cmd += [str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def tiny_pretrain_args(data_csv, out_dir, epochs=2, size=32, batch=2, **extra) -> list:
    """Flags for a seconds-long pretraining run of the tiny MAE."""
    args = ["--data_path", data_csv, "--output_dir", out_dir, "--model", "mae_vit_tiny_patch16",
            "--input_size", size, "--epochs", epochs, "--warmup_epochs", 1, "--batch_size", batch,
            "--num_workers", 0, "--blr", 1e-3, "--print_freq", 1, "--device", "cpu", "--save_every", 2,
            "--vis_every", 0]
    for k, v in extra.items():
        args += [f"--{k}", v] if v is not True else [f"--{k}"]
    return args


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
