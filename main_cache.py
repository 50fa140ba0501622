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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from util import args as cli_args
from util.run_folder import STATUS

if TYPE_CHECKING:
    from util.volume.preprocess import PreprocessConfig

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
    p.add_argument("--save_inputs", default=None, metavar="DIR",
                   help="also write each row's cached input as training reads it (windowed to [0, 1]) for a person "
                        "to check: DIR/<table>/rowNNNN_<scan>.nii.gz on its own geometry (it overlays the scan; a "
                        "lesion box sits at its point) and rowNNNN_<scan>.png (its three mid-slices)")
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


@dataclass(frozen=True)
class CacheJob:
    """Every setting of a cache fill, resolved once from the flags (`parse_args`), then only read.

    preprocess: the flags' PreprocessConfig (None with --from_checkpoint: the checkpoint's, with `overrides`, the
    preprocessing flags typed, applied to it); workers: per process (None: min(CPUs, 16) / processes per machine);
    shard: (I, N) of --shard, 1-based."""
    csv: tuple[str, ...]
    cache_dir: str
    preprocess: PreprocessConfig | None
    from_checkpoint: str | None
    overrides: dict
    masks: bool
    workers: int | None
    shard: tuple[int, int] | None
    report: bool
    cache_step: float | None
    save_inputs: str | None

    @property
    def status_path(self) -> str:
        """exit_status.json of --cache_dir; a shard job's own in <cache_dir>/shards/I-of-N/."""
        folder = os.path.abspath(self.cache_dir)
        if self.shard:
            folder = os.path.join(folder, "shards", "{}-of-{}".format(*self.shard))
        return os.path.join(folder, STATUS)


def parse_args(argv: list[str] | None = None) -> CacheJob:
    def settings(args) -> CacheJob:
        return cli_args.settings_of(CacheJob, args, preprocess=None if args.from_checkpoint else
                                    cli_args.preprocess_config(args), masks=not args.no_masks,
                                    overrides=cli_args.typed_preprocess(args, PREPROCESS_FLAGS),
                                    shard=tuple(args.shard) if args.shard else None)
    return cli_args.parse(get_args_parser(), argv, None, settings)


cli_args.parse_before_imports(__name__, get_args_parser)  # --help and bad values: answered before torch loads

# below the parser on purpose: `--help` answers without importing torch or SimpleITK
from util.data import cache_fill, cache_rows  # noqa: E402
from util.atomic import ensure_writable_dir, remove_stale_tmp  # noqa: E402
from util.cli import run_main  # noqa: E402
from util.distributed import cleanup, init_distributed, is_main_process, on_main_then_share  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.exit_status import EXIT_PREEMPTED, Preempted  # noqa: E402
from util.runtime import Runtime  # noqa: E402
from util.volume.preprocess import PreprocessConfig  # noqa: E402


def preprocess_settings(job: CacheJob) -> PreprocessConfig:
    """The flags' PreprocessConfig, or the checkpoint's (--from_checkpoint) with the flags you type overriding it
    through PreprocessConfig.with_overrides (validated again)."""
    if not job.from_checkpoint:
        return job.preprocess
    from util.task.record import read_record

    saved = read_record(job.from_checkpoint).preprocess
    if saved is None:
        raise UserError(f"{job.from_checkpoint}: has no saved preprocessing ('preprocess'); give the "
                        f"preprocessing flags (--input_size, --spacing, ...) instead of --from_checkpoint.")
    if job.overrides:
        print(f"Preprocessing of {job.from_checkpoint} overridden by "
              f"{', '.join('--' + ('input_size' if k == 'size' else k) for k in job.overrides)}.")
    return saved.with_overrides(**job.overrides)


def cache_settings(job: CacheJob):
    """The CacheSettings the flags ask for, or None (the folder's own, or the defaults for a new folder)."""
    from util.volume.cache import CacheSettings

    return None if job.cache_step is None else CacheSettings(step_hu=job.cache_step)


def check_cache_dir(job: CacheJob) -> None:
    """A writable folder of this cache format whose failures.csv, if any, is readable (before any work is done)."""
    from util.volume.cache import VolumeCache

    ensure_writable_dir(job.cache_dir, "--cache_dir")
    VolumeCache(job.cache_dir, cache_settings(job))  # refuses another format or other settings in one sentence
    cache_fill.read_failures(os.path.join(job.cache_dir, cache_fill.FAILURES_NAME))
    if job.save_inputs:
        ensure_writable_dir(job.save_inputs, "--save_inputs folder")
    if job.shard:
        os.makedirs(os.path.dirname(job.status_path), exist_ok=True)  # this shard's exit_status.json goes there


def report(job: CacheJob, rt: Runtime, workers: int, cfg: PreprocessConfig, rows, result, started: float) -> None:
    """Rank 0: failures.csv, leftovers of killed writers, and the one-line summary."""
    listed = cache_fill.update_failures(job.cache_dir, cfg.key(), rows, result.failed, result.finished)
    removed = remove_stale_tmp(job.cache_dir, recursive=True, older_than=started)  # killed writers' files
    if removed:
        print(f"Removed {removed} temporary files left by an interrupted run.")
    per_volume = f", {result.work_seconds / result.done:.1f} s per new volume in a worker" if result.done else ""
    print(f"Cache {job.cache_dir}: {result.done} done (newly cached), {result.cached} already cached, "
          f"{len(result.failed)} failed, {result.bytes / 2 ** 30:.3f} GiB ({result.bytes:,} bytes) written, "
          f"{time.time() - started:.1f} s ({rt.world_size} process{'es' if rt.world_size > 1 else ''} x {workers} "
          f"workers{per_volume}).")
    if result.stopped:
        left = len(rows) - len(result.finished)
        print(f"Stopped by {result.stopped}: {left} of {len(rows)} rows not done yet; rerun the same command to "
              f"resume.", file=sys.stderr)
    if result.failed:
        first = result.failed[min(result.failed)][0]
        print(f"{len(result.failed)} of {len(rows)} rows failed (first: {first}); all are listed with their "
              f"reasons in {listed}.", file=sys.stderr)


def main(job: CacheJob) -> int:
    started = time.time()
    rt = init_distributed("cpu")  # gloo: no GPU needed, ranks on CPU-only machines
    workers = job.workers or cache_fill.default_workers()
    cfg = preprocess_settings(job)
    rows = cache_fill.read_rows(list(job.csv), masks=job.masks, cfg=cfg)
    part = ""
    if job.shard:
        part = f" (shard {job.shard[0]} of {job.shard[1]}: {{}} of {len(rows)} rows)"
        rows = cache_rows.shard_rows(rows, *job.shard)
        part = part.format(len(rows))
    on_main_then_share(lambda: check_cache_dir(job))
    if job.report:
        code = report_missing(job, cfg, rows) if is_main_process() else 0
        cleanup()
        return code
    print(f"Caching {len(rows)} rows{part} of {', '.join(job.csv)} into {job.cache_dir} with {rt.world_size} "
          f"process{'es' if rt.world_size > 1 else ''} x {workers} workers; preprocessing "
          f"{cfg.to_dict()} (key {cfg.key()}).")
    result = cache_fill.fill_cache(rows, cfg, job.cache_dir, workers, rt.rank, rt.world_size, job.save_inputs)
    if is_main_process():
        report(job, rt, workers, cfg, rows, result, started)
    cleanup()
    if job.save_inputs and is_main_process():
        print(f"Inputs as training reads them: {job.save_inputs}/<table>/rowNNNN_<scan>.nii.gz and .png (rows from 1)")
    if result.stopped:
        raise Preempted(f"Cache fill stopped by {result.stopped} after {len(result.finished)} of {len(rows)} rows; "
                        f"rerun the same command to resume.", EXIT_PREEMPTED)
    return 2 if result.failed and is_main_process() else 0


def report_missing(job: CacheJob, cfg: PreprocessConfig, rows) -> int:
    """--report: one line of totals, the first missing rows, <cache_dir>/missing.csv; 2 when any row is missing."""
    from util.volume.cache import VolumeCache

    missing = cache_rows.report_missing(rows, cfg, VolumeCache(job.cache_dir))
    failed = sum(m["state"] == "failed" for m in missing)
    print(f"Cache {job.cache_dir}: {len(rows) - len(missing)} of {len(rows)} rows cached, {failed} failed, "
          f"{len(missing) - failed} missing (preprocessing {cfg.key()}).")
    if not missing:
        return 0
    for m in missing[:10]:
        why = m["error"] or f"{m['Path']}: not cached yet (its shard has not run, or was stopped)"
        print(f"  {m['state']}: {m['where']}: {why}", file=sys.stderr)
    more = f" ({len(missing) - 10} more)" if len(missing) > 10 else ""
    print(f"{len(missing)} of {len(rows)} rows are not cached{more}; all are listed in "
          f"{os.path.join(job.cache_dir, cache_rows.MISSING_NAME)}; rerun the fill, which skips what is cached "
          f"(failed rows: fix or drop the files).", file=sys.stderr)
    return 2


def cli_main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the command line), fill the cache, return the exit status (0, or 2: rows failed)."""
    job = parse_args(argv)
    return run_main(main, job, job.status_path)


if __name__ == "__main__":
    sys.exit(cli_main())
