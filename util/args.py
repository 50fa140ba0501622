"""Command-line pieces shared by the scripts: flag groups with their ranges, presets, the checks run right after
parsing, and settings objects built from flags.

Light on purpose: building a parser imports no torch, timm or SimpleITK, so `--help` answers at once and a bad
value is refused in a fraction of a second. Every numeric flag declares its range next to it (`bounded`), so
argparse itself says `--epochs: must be >= 1, got -3`; rules between flags are checked in `check_args`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

from dataclasses import fields, is_dataclass

from util.plain import plain
from util.errors import UserError
from util.nn.registry import ModelSpec, model_names
from util.runtime import default_num_workers
from util.task.flags import is_dense
from util.triple import to_3tuple
from util.train.settings import Optimization, RunOptions

MAE_MODELS, VIT_MODELS = model_names("mae"), model_names("vit")  # util.nn.registry: the one table of models
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
INTERPOLATORS = ("bspline", "linear", "nearest")


def bounded(kind: type = int, min: float | None = None, max: float | None = None, min_open: bool = False,
            max_open: bool = False) -> Callable[[str], int | float]:
    """An argparse `type=` that converts to `kind` and refuses values outside the range (and NaN or inf) with
    `must be >= 1, got -3`; `min_open`/`max_open` exclude the bound itself. Its `range_text` shows in --help."""
    lo = None if min is None else f"{'>' if min_open else '>='} {min:g}"
    hi = None if max is None else f"{'<' if max_open else '<='} {max:g}"
    text = " and ".join(t for t in (lo, hi) if t)
    noun = "an integer" if kind is int else "a number"

    def convert(value: str):
        try:
            x = kind(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {noun}{' ' + text if text else ''}, got {value!r}") from None
        bad_low = min is not None and (x <= min if min_open else x < min)
        bad_high = max is not None and (x >= max if max_open else x > max)
        if not math.isfinite(x) or bad_low or bad_high:
            raise argparse.ArgumentTypeError(f"must be {text or 'finite'}, got {value}")
        return x

    convert.__name__ = kind.__name__
    convert.range_text = text
    return convert


def pos_weight(value: str) -> str:
    """--pos_weight: 'auto' or a positive number (kept as typed; util.task.tasks reads it)."""
    if value != "auto":
        bounded(float, min=0, min_open=True)(value)
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's range and its default, except where the help already says the default, the flag
    is required, or the default is None or off (the help then says what happens without it)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        notes = []
        shown = action.default not in (None, False, argparse.SUPPRESS) and not action.required
        if shown and "default" not in text and action.option_strings:
            notes.append(f"default: {_shown(action.default)}")
        rng = getattr(action.type, "range_text", "")
        if rng:
            notes.append(rng)
        return f"{text} ({'; '.join(notes)})" if notes else text


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (`error: --epochs: must be >= 1, got -3`), exit status 2."""

    def error(self, message: str):
        message = message[len("argument "):] if message.startswith("argument ") else message
        self.exit(2, f"error: {message.rstrip('.')} (see {self.prog} --help).\n")


def make_parser(prog: str, description: str, examples: str) -> ArgumentParser:
    return ArgumentParser(prog, description=description, epilog="examples:\n" + examples,
                          formatter_class=HelpFormatter)


def parse_before_imports(module_name: str, get_parser: Callable[[], argparse.ArgumentParser]) -> None:
    """Called by a script above its heavy imports: when it runs as a program, --help and a value out of its range
    are answered before torch is imported (seconds and a gigabyte); otherwise nothing happens."""
    if module_name == "__main__":
        get_parser().parse_args()


def add_preprocess_args(parser: argparse.ArgumentParser, saved_note: str = "saved in every checkpoint",
                        cache_dir_help: str | None = None) -> None:
    """--orientation, --spacing, --window, --interpolator and --cache_dir (required when `cache_dir_help` is given:
    main_cache.py)."""
    g = parser.add_argument_group(f"preprocessing ({saved_note})")
    g.add_argument("--orientation", default="LPS", help="canonical orientation every volume is turned to: three "
                                                        "letters, one of each L/R, P/A, S/I")
    g.add_argument("--spacing", type=bounded(float, min=0, min_open=True), nargs=3, default=None,
                   metavar=("D", "H", "W"), help="resample to this spacing in mm (then crop/pad to --input_size) "
                                                 "instead of resizing the whole volume to --input_size")
    g.add_argument("--window", type=bounded(float), nargs="+", default=(-1200.0, 800.0), metavar="LO HI",
                   help="HU window mapped to [0, 1], LO < HI, of every ct channel; or one LO HI pair per ct channel "
                        "in channel order")
    g.add_argument("--channels", default=None, metavar="NAME,NAME,...",
                   help="input channels in order: one table column each (NAME, or NAME=COLUMN to read it from "
                        "another column), or, for a table without those columns, the volumes of the 4D file in Path "
                        "(default: the one CT channel Path)")
    g.add_argument("--norm", default=None, metavar="KIND[,KIND,...]",
                   help="intensity normalisation, one for every channel or one per channel: ct (the HU --window), "
                        "zscore (mean/std of the non-zero voxels: MRI), percentile (clip to 0.5-99.5%%, scale to "
                        "[0, 1]) (default: ct)")
    g.add_argument("--interpolator", default="bspline", choices=INTERPOLATORS,
                   help="image interpolation when resampling (label maps always use nearest)")
    g.add_argument("--cache_dir", default=None, required=cache_dir_help is not None,
                   help=cache_dir_help or "preprocess each volume once (see main_cache.py) and read it memory-mapped "
                                          "afterwards (default: no cache)")


def add_roi_args(parser: argparse.ArgumentParser, saved_note: str = "saved in every checkpoint") -> None:
    """--roi_mm, --roi_coords, --roi_label: lesion-level rows (a box around each row's point or mask label)."""
    g = parser.add_argument_group(f"lesion-level rows ({saved_note})")
    g.add_argument("--roi_mm", type=bounded(float, min=0, min_open=True), nargs=3, default=None,
                   metavar=("D", "H", "W"), help="each row is a box of this physical size (mm) centred on the row's "
                                                 "point (columns coordX, coordY, coordZ in mm) or mask label "
                                                 "(--roi_label), resampled to --input_size; outside the scan: air")
    g.add_argument("--roi_coords", default="LPS", choices=("LPS", "RAS"),
                   help="world coordinates of coordX/Y/Z: LPS as ITK, SimpleITK, LUNA16 use them; RAS as 3D Slicer")
    g.add_argument("--roi_label", type=bounded(int, min=0), default=None,
                   help="centre each box on the centroid of this label of the row's Mask (instead of coordX/Y/Z)")


def add_training_args(parser: argparse.ArgumentParser, model_choices, model: str, blr: float, epochs: int,
                      warmup_epochs: int, min_lr: float, output_dir: str | None, output_note: str = "") -> None:
    """The flags both trainers share; the defaults that differ (recipes) are arguments."""
    positive, natural = bounded(int, min=1), bounded(int, min=0)
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=model, choices=sorted(model_choices), help="architecture (factory name)")
    g.add_argument("--input_size", type=positive, nargs="+", default=[256], help="model input, one int or D H W")
    g.add_argument("--patch_size", type=positive, nargs="+", default=[16],
                   help="patch size, one int or D H W; --input_size must be a multiple of it")
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    g.add_argument("--grad_checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    g.add_argument("--no_memory_check", action="store_true",
                   help="start even when the memory estimate said before the first step exceeds what is available")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=positive, default=8,
                   help="per GPU (effective = batch_size x accum_iter x GPUs)")
    g.add_argument("--epochs", type=positive, default=epochs, help="training epochs")
    g.add_argument("--accum_iter", type=positive, default=1,
                   help="micro-batches per optimizer step (gradient accumulation)")
    g.add_argument("--lr", type=bounded(float, min=0, min_open=True), default=None,
                   help="absolute peak lr (default: blr x effective batch / 256)")
    g.add_argument("--blr", type=bounded(float, min=0, min_open=True), default=blr,
                   help="base lr per 256 volumes of effective batch")
    g.add_argument("--min_lr", type=bounded(float, min=0), default=min_lr, help="lr at the end of the cosine decay")
    g.add_argument("--warmup_epochs", type=natural, default=warmup_epochs,
                   help="epochs of linear lr warmup (shortened to half the run when the run is not longer)")
    g.add_argument("--weight_decay", type=bounded(float, min=0), default=0.05,
                   help="AdamW weight decay (not on norms/biases/tokens)")
    g.add_argument("--clip_grad", type=bounded(float, min=0, min_open=True), default=None,
                   help="clip the gradient norm to this value (default: no clipping)")
    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default=output_dir,
                   help="checkpoints, log.txt, TensorBoard and pictures" + output_note)
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    g.add_argument("--resume", default="auto", help="'auto' (checkpoint-last.pth in --output_dir), a path, or 'none'")
    g.add_argument("--allow_recipe_change", action="store_true",
                   help="resume even if the model, sizes, data, seed or lr differ from the checkpoint's")
    g.add_argument("--save_every_minutes", type=bounded(float, min=0), default=0.0,
                   help="also write checkpoint-last.pth inside epochs this often (0: only at epoch ends)")
    g.add_argument("--save_every_steps", type=natural, default=0, help="same, every N optimizer-aligned steps (0: off)")
    g.add_argument("--num_workers", type=natural, default=default_num_workers(),
                   help="DataLoader processes (default: min(8, CPUs available - 1))")
    g.add_argument("--crops_per_volume", type=positive, default=1,
                   help="random crops taken from each volume read (spacing mode, large volumes)")
    g.add_argument("--seed", type=natural, default=0, help="seed of every random choice (data order, crops, masks)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 on GPUs that support it, fp32 on CPU")
    g.add_argument("--print_freq", type=positive, default=20, help="progress line every N steps")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the options the user typed (so presets never override them)."""
    typed = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    return {act.dest for act in parser._actions if typed.intersection(act.option_strings)}


def announce(text: str) -> None:
    """Print a line about the settings once per run: under torchrun only the process of RANK 0 prints it."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def apply_preset(args, preset: dict, name: str) -> None:
    """Set preset values for every option the user did not type (args.explicit); say which values it set."""
    used = [k for k in preset if k not in args.explicit]
    for k in used:
        setattr(args, k, preset[k])
    announce_defaults(args, f"{name} preset", used)


def announce_defaults(args, name: str, flags) -> None:
    """One line naming the values of `flags` the user did not type (nothing when every one was typed)."""
    kept = [k for k in flags if k not in args.explicit]
    if kept:
        announce(f"Using the {name} for the flags you did not type: "
                 + ", ".join(f"{k}={getattr(args, k)}" for k in kept))


def parse(parser: argparse.ArgumentParser, argv: list[str] | None,
          presets: Callable[[argparse.Namespace], None] | None = None,
          settings: Callable[[argparse.Namespace], object] | None = None):
    """The parse step, the one place flags are read and changed: parse `argv` (default sys.argv[1:]), record the
    typed flags in args.explicit, apply `presets(args)`, run the rules between flags (`check_args`), then turn the
    Namespace into the script's frozen settings (`settings(args)`; the Namespace itself without it). A broken rule
    ends like a bad value: one `error: ...` line, status 2."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    args.explicit = explicit_flags(parser, argv)
    if presets is not None:
        presets(args)
    try:
        check_args(args)
        return settings(args) if settings is not None else args
    except UserError as e:
        parser.error(str(e))


def check_args(args) -> None:
    """The rules between flags, for whichever of them the script has: sizes of one or three positive ints with the
    input a multiple of the patch, and preprocessing flags that make a valid PreprocessConfig (LO < HI, a real
    orientation)."""
    if getattr(args, "model", None) and getattr(args, "patch_size", None):
        ModelSpec(args.model, args.input_size, args.patch_size)
    elif getattr(args, "input_size", None):
        to_3tuple(args.input_size, "--input_size")
    if is_dense(getattr(args, "task", None)) and getattr(args, "roi_mm", None):
        raise UserError("--roi_mm makes each row a box around a point or a label for classification or regression; "
                        "it cannot be combined with --task segmentation.")
    if hasattr(args, "window"):
        from util.volume.preprocess import PreprocessConfig

        PreprocessConfig().with_overrides(**typed_preprocess(args, PREPROCESS_FLAGS))


ROI_FLAGS = ("roi_mm", "roi_coords", "roi_label")
CHANNEL_FLAGS = ("channels", "norm")
PREPROCESS_FLAGS = ("orientation", "spacing", "window", "interpolator", *ROI_FLAGS, *CHANNEL_FLAGS)


def window_fields(window) -> dict:
    """--window as PreprocessConfig fields: one pair -> window; several pairs -> windows (one per ct channel)."""
    window = tuple(window)
    return {"window": window} if len(window) != 2 * (len(window) // 2) or len(window) <= 2 else \
        {"window": window[:2], "windows": window}


def typed_preprocess(args, flags: tuple[str, ...] = PREPROCESS_FLAGS) -> dict:
    """The preprocessing flags the script has, as PreprocessConfig fields; only those the user typed when
    args.explicit exists."""
    typed = getattr(args, "explicit", None)
    out = {("size" if k == "input_size" else k): getattr(args, k) for k in flags
           if hasattr(args, k) and (typed is None or k in typed) and (k not in CHANNEL_FLAGS or getattr(args, k))}
    return {**out, **window_fields(out.pop("window"))} if "window" in out else out


def preprocess_config(args):
    """The PreprocessConfig of the preprocessing flags and --input_size (training, main_cache.py)."""
    from util.volume.preprocess import PreprocessConfig

    channels = {k: getattr(args, k) for k in CHANNEL_FLAGS if getattr(args, k, None)}
    return PreprocessConfig(orientation=args.orientation, size=to_3tuple(args.input_size, "--input_size"),
                            spacing=tuple(args.spacing) if args.spacing else None,
                            **window_fields(args.window), interpolator=args.interpolator,
                            **{k: getattr(args, k) for k in ROI_FLAGS if hasattr(args, k)}, **channels)


# --- from flags to typed settings (the edge: nothing after the parse step reads a Namespace) ------------------------
def typed_flags(args) -> frozenset[str]:
    """The flags the user typed (presets and recipes never override them)."""
    return frozenset(args.explicit)


def settings_of(cls, args, **given):
    """A frozen settings dataclass `cls` whose fields are `given`, or else the flag of the same name (lists become
    tuples, so the settings are hashable and never share a list with the Namespace)."""
    def flag(name):
        value = getattr(args, name)
        return tuple(value) if isinstance(value, list) else value

    return cls(**{f.name: given[f.name] if f.name in given else flag(f.name) for f in fields(cls)})


def model_spec(args, in_chans: int = 1) -> ModelSpec:
    """--model, --input_size, --patch_size; `in_chans`: the preprocessing's channels."""
    return ModelSpec(args.model, args.input_size, args.patch_size, in_chans)


def check_jitter(preprocess, jitter: float) -> None:
    """--intensity_jitter scales and shifts values clipped to [0, 1]: refused with zscore channels."""
    if jitter > 0 and not preprocess.bounded:
        raise UserError("--intensity_jitter scales and shifts values clipped to [0, 1], but zscore channels (--norm) "
                        "leave [0, 1]; leave --intensity_jitter out or use --norm percentile.")


def add_channel_init_arg(group, flag: str) -> None:
    """--channel_init: how a 1-channel checkpoint's patch embedding starts a model of C channels."""
    group.add_argument("--channel_init", default="replicate", choices=("replicate", "random"),
                       help=f"a 1-channel {flag} into a model of C channels (--channels): replicate its patch "
                            f"embedding kernel into every channel with weight 1/C, or initialise it at random; every "
                            f"other weight is kept")


def optimization(args) -> Optimization:
    """The optimisation flags of add_training_args."""
    return settings_of(Optimization, args)


def run_options(args, output_dir: str) -> RunOptions:
    """The run flags of add_training_args, with the output folder the script resolved (its default filled in)."""
    return settings_of(RunOptions, args, output_dir=output_dir, log_dir=args.log_dir or output_dir,
                       resume=args.resume or "none")


def flags_record(settings, **resolved) -> dict:
    """A script's settings as the plain dict checkpoints store as 'args' (flag name -> value; the preprocessing is
    left out: it is stored once, as 'preprocess'), plus `resolved` values (the peak lr, the effective batch, ...)."""
    from util.task.tasks import Task  # (torch: only when a run records its flags, never for --help)

    out: dict = {}

    def walk(obj) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, Task):  # the flags it came from (--task, --regression); its name is in 'meta'
                out.update(task=value.family, regression=value.continuous)
            elif isinstance(value, ModelSpec):
                out.update(model=value.name, input_size=value.input_size, patch_size=value.patch_size,
                           in_chans=value.in_chans)
            elif type(value).__name__ == "PreprocessConfig":
                continue
            elif is_dataclass(value):
                walk(value)
            elif f.name != "typed":
                out[f.name] = value

    walk(settings)
    return plain({**out, **resolved})
