"""Command-line pieces shared by the three scripts: preprocessing flags, demo presets, precision, seeding."""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys

import numpy as np
import torch


def add_preprocess_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("preprocessing (saved in every checkpoint)")
    g.add_argument("--orientation", default="LPS", help="canonical orientation every volume is turned to")
    g.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="resample to this spacing in mm (then crop/pad to --input_size) instead of resizing "
                        "the whole volume to --input_size")
    g.add_argument("--window", type=float, nargs=2, default=(-1200.0, 800.0), metavar=("LO", "HI"),
                   help="HU window mapped to [0, 1]")
    g.add_argument("--interpolator", default="bspline", choices=["bspline", "linear", "nearest"])
    g.add_argument("--cache_dir", default=None, help="preprocess each volume once and read it memory-mapped later")


def input_size_3d(value) -> tuple[int, int, int]:
    """--input_size given as one int or three ints (D H W)."""
    if isinstance(value, int):
        return (value,) * 3
    value = list(value)
    if len(value) == 1:
        return (int(value[0]),) * 3
    if len(value) != 3:
        raise ValueError(f"--input_size takes 1 or 3 integers (D H W), got {value}.")
    return tuple(int(v) for v in value)


def preprocess_config_from_args(args):
    from datasets_three_d import PreprocessConfig

    return PreprocessConfig(orientation=args.orientation, size=tuple(args.input_size),
                            spacing=tuple(args.spacing) if args.spacing else None,
                            window=tuple(args.window), interpolator=args.interpolator)


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the options the user typed (so presets never override them)."""
    typed = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    return {act.dest for act in parser._actions if typed.intersection(act.option_strings)}


def apply_preset(args, parser, preset: dict, name: str, argv: list[str] | None = None) -> None:
    """Set preset values for every option the user did not type; say which preset is used."""
    argv = sys.argv[1:] if argv is None else argv
    given = explicit_flags(parser, argv)
    for k, v in preset.items():
        if k not in given:
            setattr(args, k, v)
    print(f"Using the {name} preset (explicit flags override it): "
          + ", ".join(f"{k}={getattr(args, k)}" for k in preset))


def check_input_size(input_size, patch_size) -> None:
    ps = patch_size if isinstance(patch_size, (list, tuple)) else (patch_size,) * 3
    ps = tuple(ps) * 3 if len(ps) == 1 else tuple(ps)
    bad = [(s, p) for s, p in zip(input_size, ps) if s % p or s < p]
    if bad:
        raise ValueError(f"--input_size {tuple(input_size)} must be a multiple of --patch_size {ps} on every axis.")


def resolve_precision(precision: str, device: str) -> str:
    if precision != "auto":
        if precision == "fp16" and not device.startswith("cuda"):
            print("fp16 needs CUDA: using fp32 on CPU.")
            return "fp32"
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(precision: str, device: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def setup_run(args) -> None:
    """Start-up shared by the training scripts: torchrun/device, threads, sizes checked, precision resolved."""
    from util.distributed import init_distributed_mode

    init_distributed_mode(args)
    torch_threads()
    args.input_size = input_size_3d(args.input_size)
    args.patch_size = input_size_3d(args.patch_size)
    check_input_size(args.input_size, args.patch_size)
    args.precision = resolve_precision(args.precision, args.device)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def check_writable_dir(path: str, what: str = "--output_dir") -> None:
    """Create `path` or fail with one sentence if it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{what} {path} is not a writable folder ({e.strerror or e}).") from None


def torch_threads() -> None:
    """Keep CPU runs from oversubscribing cores when several processes share a machine."""
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))


def run_main(main, args):
    """Run a script's main(args) and return its result; user-caused errors end as one sentence on stderr,
    without a traceback.

    Set MAE3D_DEBUG=1 to see the full traceback instead.
    """
    from util.checkpoint import CorruptCheckpointError, UnsafeCheckpointError

    user_errors = (FileNotFoundError, NotADirectoryError, PermissionError, UnsafeCheckpointError,
                   CorruptCheckpointError, ValueError, OSError)
    try:
        return main(args)
    except SystemExit as e:  # scripts stop with SystemExit("sentence") for errors found in their own checks
        if isinstance(e.code, str):
            print(f"error: {e.code}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        raise
    except user_errors as e:
        if os.environ.get("MAE3D_DEBUG"):
            raise
        msg = str(e).strip()
        if "Original Traceback" in msg:  # raised inside a DataLoader worker: keep the original sentence only
            msg = msg.splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
