"""Command-line pieces shared by the scripts: flag groups, presets, and settings objects built from flags."""
from __future__ import annotations

import argparse
import sys

from util.preprocess import PreprocessConfig
from util.runtime import default_num_workers
from util.triple import to_3tuple


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default (unless its help already says it) and keeps the examples' line breaks."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def make_parser(prog: str, description: str, examples: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog, description=description, epilog="examples:\n" + examples,
                                   formatter_class=HelpFormatter)


def add_preprocess_args(parser: argparse.ArgumentParser, saved_note: str = "saved in every checkpoint") -> None:
    g = parser.add_argument_group(f"preprocessing ({saved_note})")
    g.add_argument("--orientation", default="LPS", help="canonical orientation every volume is turned to")
    g.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="resample to this spacing in mm (then crop/pad to --input_size) instead of resizing "
                        "the whole volume to --input_size")
    g.add_argument("--window", type=float, nargs=2, default=(-1200.0, 800.0), metavar=("LO", "HI"),
                   help="HU window mapped to [0, 1]")
    g.add_argument("--interpolator", default="bspline", choices=["bspline", "linear", "nearest"],
                   help="image interpolation when resampling (label maps always use nearest)")
    g.add_argument("--cache_dir", default=None, help="preprocess each volume once (see main_cache.py) and read it "
                                                     "memory-mapped afterwards")


def add_training_args(parser: argparse.ArgumentParser, model_choices, model: str, blr: float, epochs: int,
                      warmup_epochs: int, min_lr: float, output_dir: str | None) -> None:
    """The flags both trainers share; the defaults that differ (recipes) are arguments."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=model, choices=sorted(model_choices), help="architecture (factory name)")
    g.add_argument("--input_size", type=int, nargs="+", default=[256], help="model input, one int or D H W")
    g.add_argument("--patch_size", type=int, nargs="+", default=[16], help="patch size, one int or D H W")
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    g.add_argument("--grad_checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=8, help="per GPU (effective = batch_size x accum_iter x GPUs)")
    g.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    g.add_argument("--accum_iter", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    g.add_argument("--lr", type=float, default=None, help="absolute peak lr; default blr x effective batch / 256")
    g.add_argument("--blr", type=float, default=blr, help="base lr per 256 volumes of effective batch")
    g.add_argument("--min_lr", type=float, default=min_lr, help="lr at the end of the cosine decay")
    g.add_argument("--warmup_epochs", type=int, default=warmup_epochs, help="epochs of linear lr warmup")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (not on norms/biases/tokens)")
    g.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm to this value")
    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default=output_dir, help="checkpoints, log.txt, TensorBoard and pictures")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    g.add_argument("--resume", default="auto", help="'auto' (checkpoint-last.pth in --output_dir), a path, or 'none'")
    g.add_argument("--allow_recipe_change", action="store_true",
                   help="resume even if the model, sizes, data, seed or lr differ from the checkpoint's")
    g.add_argument("--save_every_minutes", type=float, default=0.0,
                   help="also write checkpoint-last.pth inside epochs this often (0: only at epoch ends)")
    g.add_argument("--save_every_steps", type=int, default=0, help="same, every N optimizer-aligned steps (0: off)")
    g.add_argument("--num_workers", type=int, default=default_num_workers(),
                   help="DataLoader processes (default: min(8, CPUs available - 1))")
    g.add_argument("--crops_per_volume", type=int, default=1,
                   help="random crops taken from each volume read (spacing mode, large volumes)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (data order, crops, masks)")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPUs that support it, fp32 on CPU")
    g.add_argument("--print_freq", type=int, default=20, help="progress line every N steps")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the options the user typed (so presets never override them)."""
    typed = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    return {act.dest for act in parser._actions if typed.intersection(act.option_strings)}


def apply_preset(args, preset: dict, name: str) -> None:
    """Set preset values for every option the user did not type (args.explicit); say which preset is used."""
    for k, v in preset.items():
        if k not in args.explicit:
            setattr(args, k, v)
    print(f"Using the {name} preset (flags you type override it): "
          + ", ".join(f"{k}={getattr(args, k)}" for k in preset))


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv` (default sys.argv[1:]) and record the typed flags in args.explicit."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    args.explicit = explicit_flags(parser, argv)
    return args


def check_sizes(args) -> None:
    """input_size / patch_size as 3-tuples, the input a multiple of the patch on every axis."""
    args.input_size = to_3tuple(args.input_size, "--input_size")
    args.patch_size = to_3tuple(args.patch_size, "--patch_size")
    if any(s % p for s, p in zip(args.input_size, args.patch_size)):
        raise ValueError(f"--input_size {args.input_size} must be a multiple of --patch_size {args.patch_size} "
                         f"on every axis.")


def preprocess_config(args) -> PreprocessConfig:
    return PreprocessConfig(orientation=args.orientation, size=tuple(args.input_size),
                            spacing=tuple(args.spacing) if args.spacing else None,
                            window=tuple(args.window), interpolator=args.interpolator)
