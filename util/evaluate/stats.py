"""Metrics of frozen-embedding probes and their bootstrap intervals: the one bootstrap of the repository
(main_evaluate.py and bench/lidc_transfer.py use it).

A resample of the test rows is one row of a weight matrix W [B, n] (how many times each row was drawn); the
metrics take such weights (util.task.weighted, chosen by the task) so B resamples cost B weighted sums, not B
sorts. The point estimate is W = 1. `task` arguments are util.task.tasks.Task objects or their names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from util.task.tasks import as_task

@dataclass
class Run:
    """The out-of-fold predictions of one probe on the test rows.

    scores: [n, K] class probabilities (binary: K = 2, or a 1-D score of the positive class), multi-label [n, K]
        probabilities, regression [n, K] predicted values. pred: [n] class indices, [n, K] 0/1 for multi-label,
        None for regression (or when only AUROC is wanted)."""
    scores: np.ndarray
    pred: np.ndarray | None = None


def weighted_metrics(task, y: np.ndarray, run: Run, w: np.ndarray,
                     names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Every metric of `run` against `y` under each row of weights w [B, n] -> {name: [B]}, as the task (a
    util.task.tasks.Task) defines them (util.task.weighted).

    y: class indices [n] (binary, multiclass), 0/1 [n, K] (multilabel), values [n, K] (regression).
    Classification: 'auroc' (macro over classes/labels with both kinds of rows), 'auroc_<name>' per class or
    label (multiclass, multilabel), 'balanced_accuracy' (when run.pred is given; multilabel: mean over labels).
    Regression: 'mae' and 'r2' (means over the target columns)."""
    w = np.atleast_2d(np.asarray(w))  # float32 counts are exact: sums stay below 2^24
    return as_task(task).weighted_metrics(y, run.scores, run.pred, w, names)


def resample_weights(n: int, n_boot: int, seed: int, groups: np.ndarray | None = None,
                     batch: int = 64) -> Iterator[np.ndarray]:
    """Batches of bootstrap weights [b, n]: rows drawn with replacement (or, with `groups` [n] of group indices
    0..G-1, whole groups drawn with replacement, every row of a drawn group counted), b summing to n_boot."""
    rng = np.random.default_rng([seed, 7])
    units = n if groups is None else int(groups.max()) + 1
    done = 0
    while done < n_boot:
        b = min(batch, n_boot - done)
        idx = rng.integers(0, units, (b, units), dtype=np.int64) + units * np.arange(b)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * units).reshape(b, units).astype(np.float32)
        yield counts if groups is None else counts[:, groups]
        done += b


def bootstrap_values(task, y: np.ndarray, runs: Sequence[Run], n_boot: int = 1000, seed: int = 0,
                     groups: np.ndarray | None = None, names: Sequence[str] = ()) -> list[dict[str, np.ndarray]]:
    """Every metric of every run on all rows and on `n_boot` resamples of them (whole groups, when `groups` [n]
    of indices 0..G-1 is given), the same resamples for every run: per run {metric: [1 + n_boot]}, the point
    first. Differences and means of these vectors are paired bootstraps (see `interval`)."""
    parts = [[weighted_metrics(task, y, r, np.ones((1, len(y))), names)] for r in runs]
    for w in resample_weights(len(y), n_boot, seed, groups):
        for k, r in enumerate(runs):
            parts[k].append(weighted_metrics(task, y, r, w, names))
    return [{m: np.concatenate([p[m] for p in chunks]) for m in chunks[0]} for chunks in parts]


def interval(values: Sequence[np.ndarray], refs: Sequence[np.ndarray] | None = None,
             level: float = 0.95) -> tuple[float, float, float]:
    """(point, low, high) of the mean over `values` (one [1 + B] vector per label draw, from bootstrap_values), or
    of the mean of value - ref (paired): the point from entry 0, the interval the central `level` of the B
    resamples (nan without resamples)."""
    v = np.mean(values, axis=0) - (np.mean(refs, axis=0) if refs is not None else 0.0)
    boots = v[1:][np.isfinite(v[1:])]
    if not len(boots):
        return float(v[0]), float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(boots, [tail, 100 - tail])
    return float(v[0]), float(lo), float(hi)


def bootstrap(task, y: np.ndarray, runs: Sequence[Run], refs: Sequence[Run] | None = None,
              n_boot: int = 1000, seed: int = 0, groups: np.ndarray | None = None, names: Sequence[str] = (),
              level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """Each metric's mean over `runs` (several label draws scored on the same rows), or, with `refs` (one per
    run, paired), the mean of run - ref, as (point, low, high) over `n_boot` resamples shared by every run and
    reference."""
    vals = bootstrap_values(task, y, [*runs, *(refs or [])], n_boot, seed, groups, names)
    mine, theirs = vals[:len(runs)], vals[len(runs):]
    return {m: interval([v[m] for v in mine], [v[m] for v in theirs] if refs is not None else None, level)
            for m in mine[0]}
