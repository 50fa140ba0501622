"""Fill the preprocessed-volume cache ahead of training: one command, parallel, resumable, across machines.

    python main_cache.py --csv scans.csv --cache_dir /scratch/cache --input_size 256
    torchrun --nnodes=4 --nproc_per_node=1 --rdzv_backend c10d --rdzv_endpoint=$HOST:29500 \
        main_cache.py --csv scans.csv --cache_dir /shared/cache      # rank r takes rows r, r + W, ...

The preprocessing flags and their defaults are the training scripts' own, so every entry written here is a cache
hit for main_pretrain.py / main_finetune.py / main_predict.py run with the same flags and --cache_dir
(--from_checkpoint takes the settings a checkpoint saved instead). Label maps of a `Mask` column are cached too.
Rows already cached are skipped, so a killed run is simply started again. Failed rows are listed with their
reason in <cache_dir>/failures.csv; the exit status is 2 when any row failed (torchrun then reports a failure).
"""
from __future__ import annotations

import os
import sys
import time

from util import args as cli_args

PREPROCESS_FLAGS = ("input_size", *cli_args.PREPROCESS_FLAGS)
EXAMPLES = """  python main_cache.py --csv scans.csv --cache_dir /scratch/cache --input_size 256
  python main_cache.py --csv train.csv val.csv --cache_dir /scratch/cache --input_size 96 --spacing 2 1.5 1.5
  python main_cache.py --csv scans.csv --cache_dir /scratch/cache --from_checkpoint mae_pretrained.pth
  torchrun --standalone --nproc_per_node=2 main_cache.py --csv scans.csv --cache_dir /scratch/cache
  python main_cache.py --csv nodules.csv --cache_dir /scratch/cache --input_size 64 --roi_mm 50 50 50
"""


def get_args_parser():
    p = cli_args.make_parser("main_cache.py", "Preprocess every volume of the tables into --cache_dir once, in "
                             "parallel, before training (resumable; failed rows go to failures.csv).", EXAMPLES)
    p.add_argument("--csv", nargs="+", required=True, help="required: tables with a Path column (and optionally "
                                                           "Mask), or text files with one path per line")
    p.add_argument("--input_size", type=cli_args.bounded(int, min=1), nargs="+", default=[256],
                   help="model input, one int or D H W (as given to training)")
    p.add_argument("--no_masks", action="store_true", help="do not cache the label maps of a Mask column")
    p.add_argument("--from_checkpoint", default=None, help="use the preprocessing saved in this checkpoint "
                                                           "(preprocessing flags you type override it)")
    p.add_argument("--workers", type=cli_args.bounded(int, min=1), default=None,
                   help="worker processes per torchrun process (default: min(CPUs, 16) / processes per machine)")
    cli_args.add_preprocess_args(p, "the same flags and defaults as training, so the cache keys match",
                                 cache_dir_help="required: the folder the preprocessed volumes are written to")
    cli_args.add_roi_args(p, "the same flags as training: one box per row is cached")
    return p


cli_args.parse_before_imports(__name__, get_args_parser)  # --help and bad values: answered before torch loads

# below the parser on purpose: `--help` answers without importing torch or SimpleITK
from util.data import cache_fill  # noqa: E402
from util.atomic import ensure_writable_dir, remove_stale_tmp  # noqa: E402
from util.distributed import cleanup, init_distributed_mode, is_main_process, on_main_then_share  # noqa: E402
from util.errors import UserError, run_main  # noqa: E402
from util.volume.preprocess import PreprocessConfig  # noqa: E402


def preprocess_settings(args) -> PreprocessConfig:
    """The flags' PreprocessConfig, or the checkpoint's (--from_checkpoint) with the flags you type overriding it
    through PreprocessConfig.with_overrides (validated again)."""
    if not args.from_checkpoint:
        return cli_args.preprocess_config(args)
    from util.checkpoint import load_checkpoint

    saved = load_checkpoint(args.from_checkpoint).get("preprocess")
    if not isinstance(saved, dict):
        raise UserError(f"{args.from_checkpoint}: has no saved preprocessing ('preprocess'); give the "
                        f"preprocessing flags (--input_size, --spacing, ...) instead of --from_checkpoint.")
    changes = cli_args.typed_preprocess(args, PREPROCESS_FLAGS)
    if changes:
        print(f"Preprocessing of {args.from_checkpoint} overridden by "
              f"{', '.join('--' + k for k in PREPROCESS_FLAGS if k in args.explicit)}.")
    return PreprocessConfig.from_dict(saved).with_overrides(**changes)


def check_cache_dir(cache_dir: str) -> None:
    """A writable folder whose failures.csv, if any, is readable (checked before any work is done)."""
    ensure_writable_dir(cache_dir, "--cache_dir")
    cache_fill.read_failures(os.path.join(cache_dir, cache_fill.FAILURES_NAME))


def report(args, cfg: PreprocessConfig, rows, result, started: float) -> None:
    """Rank 0: failures.csv, leftovers of killed writers, and the one-line summary."""
    listed = cache_fill.update_failures(args.cache_dir, cfg.key(), rows, result.failed)
    removed = remove_stale_tmp(args.cache_dir, recursive=True, older_than=started)  # killed writers' files
    if removed:
        print(f"Removed {removed} temporary files left by an interrupted run.")
    per_volume = f", {result.work_seconds / result.done:.1f} s per new volume in a worker" if result.done else ""
    print(f"Cache {args.cache_dir}: {result.done} done (newly cached), {result.cached} already cached, "
          f"{len(result.failed)} failed, {result.bytes / 2 ** 30:.3f} GiB ({result.bytes:,} bytes) written, {time.time() - started:.1f} s "
          f"({args.world_size} process{'es' if args.world_size > 1 else ''} x {args.workers} workers{per_volume}).")
    if result.failed:
        first = result.failed[min(result.failed)][0]
        print(f"{len(result.failed)} of {len(rows)} rows failed (first: {first}); all are listed with their "
              f"reasons in {listed}.", file=sys.stderr)


def main(args) -> int:
    started = time.time()
    args.device = "cpu"  # gloo: no GPU needed, ranks on CPU-only machines
    init_distributed_mode(args)
    args.workers = args.workers or cache_fill.default_workers()
    cfg = preprocess_settings(args)
    rows = cache_fill.read_rows(args.csv, masks=not args.no_masks, cfg=cfg)
    on_main_then_share(lambda: check_cache_dir(args.cache_dir))
    print(f"Caching {len(rows)} rows of {', '.join(args.csv)} into {args.cache_dir} with {args.world_size} "
          f"process{'es' if args.world_size > 1 else ''} x {args.workers} workers; preprocessing "
          f"{cfg.to_dict()} (key {cfg.key()}).")
    result = cache_fill.fill_cache(rows, cfg, args.cache_dir, args.workers, args.rank, args.world_size)
    if is_main_process():
        report(args, cfg, rows, result, started)
    cleanup()
    return 2 if result.failed and is_main_process() else 0


def cli_main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the command line), fill the cache, return the exit status (0, or 2: rows failed)."""
    return run_main(main, cli_args.parse(get_args_parser(), argv))


if __name__ == "__main__":
    sys.exit(cli_main())
