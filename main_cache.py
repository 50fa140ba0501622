"""Fill the preprocessed-volume cache ahead of training: one command, parallel, resumable, across machines.

    python main_cache.py --csv scans.csv --cache_dir /scratch/cache --input_size 256
    torchrun --nnodes=4 --nproc_per_node=1 --rdzv_backend c10d --rdzv_endpoint=$HOST:29500 \
        main_cache.py --csv scans.csv --cache_dir /shared/cache      # rank r takes rows r, r + W, ...
    python main_cache.py --csv scans.csv --cache_dir /shared/cache --shard $SLURM_ARRAY_TASK_ID/64   # array 1-64
    python main_cache.py --csv scans.csv --cache_dir /shared/cache --report    # last pass: what is missing

The preprocessing flags and their defaults are the training scripts' own, so every entry written here is a cache
hit for main_pretrain.py / main_finetune.py / main_predict.py run with the same flags and --cache_dir
(--from_checkpoint takes the settings a checkpoint saved instead). Label maps of a `Mask` column are cached too.
Rows already cached are skipped, so a killed run is simply started again. Failed rows are listed with their
reason in <cache_dir>/failures.csv; the exit status is 2 when any row failed (torchrun then reports a failure).
--shard I/N (1-based) caches the I-th of N parts of the tables, with no coordination between the N jobs
(util.data.cache_rows); --report lists the rows still missing or failed (missing.csv) and exits 2 when any is.
SIGTERM / SIGUSR1 (preemption) end the workers, write `exit_status.json` (75) and exit 75: rerun to resume.
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
  python main_cache.py --csv scans.csv --cache_dir /shared/cache --shard 3/64     # one job of 64, no coordination
  python main_cache.py --csv scans.csv --cache_dir /shared/cache --report         # which rows are still missing
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
    p.add_argument("--shard", type=shard_flag, default=None, metavar="I/N",
                   help="cache only the I-th of N parts of the tables (1 <= I <= N; rows of one scan stay together); "
                        "N independent jobs, e.g. a SLURM array 1-N, cover every row once")
    p.add_argument("--report", action="store_true", help="cache nothing: list the rows still missing or failed "
                   "in <cache_dir>/missing.csv; exit status 2 when any is (the last pass after the shards)")
    p.add_argument("--cache_step", type=cli_args.bounded(float, min=0, min_open=True), default=None, metavar="HU",
                   help="quantisation step of cached images in HU for a new --cache_dir (default 1: max error "
                        "0.5 HU, and -32768..32767 HU held; entries keep HU, so every --window reads them)")
    cli_args.add_preprocess_args(p, "the same flags and defaults as training, so the cache keys match",
                                 cache_dir_help="required: the folder the preprocessed volumes are written to")
    cli_args.add_roi_args(p, "the same flags as training: one box per row is cached")
    return p


def shard_flag(text: str) -> tuple[int, int]:
    """argparse type of --shard: 'I/N' -> (I, N) with 1 <= I <= N."""
    import argparse

    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"must be I/N with 1 <= I <= N (1-based: the first of 8 is 1/8), got {text!r}")
    return i, n


cli_args.parse_before_imports(__name__, get_args_parser)  # --help and bad values: answered before torch loads

# below the parser on purpose: `--help` answers without importing torch or SimpleITK
from util.data import cache_fill, cache_rows  # noqa: E402
from util.atomic import ensure_writable_dir, remove_stale_tmp  # noqa: E402
from util.distributed import cleanup, init_distributed_mode, is_main_process, on_main_then_share  # noqa: E402
from util.errors import UserError, run_main  # noqa: E402
from util.exit_status import EXIT_PREEMPTED, Preempted  # noqa: E402
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


def cache_settings(args):
    """The CacheSettings the flags ask for, or None (the folder's own, or the defaults for a new folder)."""
    from util.volume.cache import CacheSettings

    return None if args.cache_step is None else CacheSettings(step_hu=args.cache_step)


def check_cache_dir(args) -> None:
    """A writable folder of this cache format whose failures.csv, if any, is readable (before any work is done)."""
    from util.volume.cache import VolumeCache

    ensure_writable_dir(args.cache_dir, "--cache_dir")
    VolumeCache(args.cache_dir, cache_settings(args))  # refuses another format or other settings in one sentence
    cache_fill.read_failures(os.path.join(args.cache_dir, cache_fill.FAILURES_NAME))
    if args.shard:
        os.makedirs(args.output_dir, exist_ok=True)  # this shard's exit_status.json goes there


def report(args, cfg: PreprocessConfig, rows, result, started: float) -> None:
    """Rank 0: failures.csv, leftovers of killed writers, and the one-line summary."""
    listed = cache_fill.update_failures(args.cache_dir, cfg.key(), rows, result.failed, result.finished)
    removed = remove_stale_tmp(args.cache_dir, recursive=True, older_than=started)  # killed writers' files
    if removed:
        print(f"Removed {removed} temporary files left by an interrupted run.")
    per_volume = f", {result.work_seconds / result.done:.1f} s per new volume in a worker" if result.done else ""
    print(f"Cache {args.cache_dir}: {result.done} done (newly cached), {result.cached} already cached, "
          f"{len(result.failed)} failed, {result.bytes / 2 ** 30:.3f} GiB ({result.bytes:,} bytes) written, {time.time() - started:.1f} s "
          f"({args.world_size} process{'es' if args.world_size > 1 else ''} x {args.workers} workers{per_volume}).")
    if result.stopped:
        left = len(rows) - len(result.finished)
        print(f"Stopped by {result.stopped}: {left} of {len(rows)} rows not done yet; rerun the same command to "
              f"resume.", file=sys.stderr)
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
    part = ""
    if args.shard:
        part = f" (shard {args.shard[0]} of {args.shard[1]}: {{}} of {len(rows)} rows)"
        rows = cache_rows.shard_rows(rows, *args.shard)
        part = part.format(len(rows))
    on_main_then_share(lambda: check_cache_dir(args))
    if args.report:
        code = report_missing(args, cfg, rows) if is_main_process() else 0
        cleanup()
        return code
    print(f"Caching {len(rows)} rows{part} of {', '.join(args.csv)} into {args.cache_dir} with {args.world_size} "
          f"process{'es' if args.world_size > 1 else ''} x {args.workers} workers; preprocessing "
          f"{cfg.to_dict()} (key {cfg.key()}).")
    result = cache_fill.fill_cache(rows, cfg, args.cache_dir, args.workers, args.rank, args.world_size)
    if is_main_process():
        report(args, cfg, rows, result, started)
    cleanup()
    if result.stopped:
        raise Preempted(f"Cache fill stopped by {result.stopped} after {len(result.finished)} of {len(rows)} rows; "
                        f"rerun the same command to resume.", EXIT_PREEMPTED)
    return 2 if result.failed and is_main_process() else 0


def report_missing(args, cfg: PreprocessConfig, rows) -> int:
    """--report: one line of totals, the first missing rows, <cache_dir>/missing.csv; 2 when any row is missing."""
    from util.volume.cache import VolumeCache

    missing = cache_rows.report_missing(rows, cfg, VolumeCache(args.cache_dir))
    failed = sum(m["state"] == "failed" for m in missing)
    print(f"Cache {args.cache_dir}: {len(rows) - len(missing)} of {len(rows)} rows cached, {failed} failed, "
          f"{len(missing) - failed} missing (preprocessing {cfg.key()}).")
    if not missing:
        return 0
    for m in missing[:10]:
        why = m["error"] or f"{m['Path']}: not cached yet (its shard has not run, or was stopped)"
        print(f"  {m['state']}: {m['where']}: {why}", file=sys.stderr)
    more = f" ({len(missing) - 10} more)" if len(missing) > 10 else ""
    print(f"{len(missing)} of {len(rows)} rows are not cached{more}; all are listed in "
          f"{os.path.join(args.cache_dir, cache_rows.MISSING_NAME)}; rerun the fill, which skips what is cached "
          f"(failed rows: fix or drop the files).", file=sys.stderr)
    return 2


def cli_main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the command line), fill the cache, return the exit status (0, or 2: rows failed)."""
    args = cli_args.parse(get_args_parser(), argv)
    if args.shard:  # each shard job has its own exit_status.json (util.exit_status writes it into output_dir)
        args.output_dir = os.path.join(os.path.abspath(args.cache_dir), "shards", "{}-of-{}".format(*args.shard))
    return run_main(main, args)


if __name__ == "__main__":
    sys.exit(cli_main())
