"""Coverage of main_evaluate.py's 95% intervals by simulation, the large version of
tests/test_evaluate_coverage.py: both probes, more sizes, more repetitions.

Each repetition draws a data set (n rows, a share of positives, DIM Gaussian features; class 1 shifted by
--shift along the first feature, 0 for pure noise), runs main_evaluate.py's cross-validation code path
(util/evaluate/crossval.fold_job: 5 stratified folds, refitted bootstrap) and checks whether the interval holds
the target: 0.5 for noise; otherwise the AUROC the probe, trained on a training fold's number of rows, reaches on
new rows, averaged over training sets (estimated here from --target_reps probes each scored on 20,000 new rows).

    python bench/bench_coverage.py                                  # 200 repetitions per setting (about 1 h)
    python bench/bench_coverage.py --sizes 50 200 --reps 100 --protocols logreg
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from util.evaluate.crossval import fold_job  # noqa: E402
from util.evaluate.probe import make_folds  # noqa: E402
from util.evaluate.stats import refit_interval, resample_weights  # noqa: E402
from util.task.tasks import BinaryTask  # noqa: E402
from util.task.weighted import nanmean  # noqa: E402

DIM, TASK = 4, BinaryTask()


def simulate(rng, n, positives, shift, n_pos=None):
    y = (np.arange(n) < (round(positives * n) if n_pos is None else n_pos)).astype(np.int64)
    x = rng.normal(size=(n, DIM))
    x[:, 0] += shift * y
    return x.astype(np.float32), y


def run(x, y, protocol, seed, resamples, train=None, test=None):
    """fold_job's AUROC values [1 + resamples] averaged over 5 folds, or on one given train/test split."""
    counts = np.concatenate(list(resample_weights(len(y), resamples, seed))) if resamples else None
    splits = [(train, test)] if train is not None else make_folds(len(y), 5, seed, y)
    per = [fold_job(x, tr, te, y, None, {(1.0, 0): tr}, protocol, TASK, 2, ["0", "1"], seed, 20, 10000,
                    counts)[(1.0, 0)][0]["auroc"] for tr, te in splits]
    return nanmean(np.array(per))


def target(n_train, positives, shift, protocol, reps, rng) -> float:
    values = []
    for r in range(reps):
        x_tr, y_tr = simulate(rng, n_train, positives, shift)
        x_te, y_te = simulate(rng, 20000, positives, shift, n_pos=int(rng.binomial(20000, positives)))
        x, y = np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])
        values.append(run(x, y, protocol, r, 0, np.arange(n_train), np.arange(n_train, len(y)))[0])
    return float(np.mean(values))


def main() -> None:
    p = argparse.ArgumentParser("coverage of main_evaluate.py's intervals")
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000])
    p.add_argument("--positives", type=float, nargs="+", default=[0.5, 0.2])
    p.add_argument("--shifts", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--protocols", nargs="+", default=["logreg", "knn"])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--target_reps", type=int, default=300)
    args = p.parse_args()
    print("| probe | n | positives | signal | target | covered | mean point | mean width | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for protocol in args.protocols:
        for n in args.sizes:
            for pos in args.positives:
                for shift in args.shifts:
                    t0, seed = time.time(), 1000 * n + int(100 * pos) + int(10 * shift)
                    rng = np.random.default_rng(seed)
                    th = 0.5 if shift == 0 else target(n * 4 // 5, pos, shift, protocol, args.target_reps, rng)
                    hits, points, widths = [], [], []
                    for r in range(args.reps):
                        point, lo, hi = refit_interval(run(*simulate(rng, n, pos, shift), protocol, seed + r,
                                                           args.resamples), bounds=(0, 1))
                        hits.append(lo <= th <= hi)
                        points.append(point)
                        widths.append(hi - lo)
                    se = np.std(points) / np.sqrt(len(points))
                    print(f"| {protocol} | {n} | {pos:.0%} | {'none' if shift == 0 else f'shift {shift:g}'} | "
                          f"{th:.3f} | {np.mean(hits):.1%} | {np.mean(points):.3f} ± {se:.3f} | "
                          f"{np.mean(widths):.3f} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
