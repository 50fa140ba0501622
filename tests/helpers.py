"""Helpers for the end-to-end tests: run the scripts as a user would, on small data."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


class _Evil:
    """Unpickling this object would create a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make_hostile_checkpoint(path, marker) -> None:
    torch.save({"model": {"w": torch.zeros(2)}, "args": _Evil(str(marker))}, path, pickle_protocol=2)


def save_tiny_mae(path: Path, size=64, prefix="module.") -> Path:
    """A TANGERINE-style file: {'model': state dict with DDP prefixes} of a tiny MAE at size^3, patch 16."""
    import models_mae3d

    torch.manual_seed(0)
    mae = models_mae3d.mae_vit_tiny_patch16(img_size=size, decoder_depth=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {prefix + k: v for k, v in mae.state_dict().items()}}, path)
    return path


def run_in_process(script: str, *args, env: dict | None = None) -> SimpleNamespace:
    """Run a script's `cli_main(args)` in this process (no interpreter start-up), like `run_script`: returns
    returncode, stdout and stderr (warnings included, one per line). `env` is set for the call only."""
    import contextlib
    import importlib
    import io
    import warnings

    module = importlib.import_module(script.removesuffix(".py"))
    out, err, code = io.StringIO(), io.StringIO(), 0
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            try:
                code = module.cli_main([str(a) for a in args]) or 0
            except SystemExit as e:
                code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1  # as a process exits
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    notes = "".join(f"{type(w.message).__name__}: {w.message}\n" for w in caught)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue() + notes)


def write_noise_ct_table(folder: Path, n: int) -> Path:
    """n small noise CTs (6 x 8 x 8 voxels of 1 x 1 x 2 mm, seeded by their number) and `t.csv` listing them."""
    import numpy as np
    import SimpleITK as sitk

    rows = []
    for s in range(n):
        img = sitk.GetImageFromArray(np.random.default_rng(s).normal(-300, 300, (6, 8, 8)).astype(np.int16))
        img.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(img, str(folder / f"ct{s}.nii.gz"))
        rows.append(str(folder / f"ct{s}.nii.gz"))
    (folder / "t.csv").write_text("Path\n" + "\n".join(rows) + "\n")
    return folder / "t.csv"
