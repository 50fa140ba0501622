"""Metrics of probes and their bootstrap intervals: the one bootstrap of the repository.

A resample is one row of a weight matrix W [B, n] (how many times each row, or each row of a drawn group, was
drawn). Two uses:
- fixed models (`bootstrap`, bench/lidc_transfer.py): models trained once, scored on one test set; resampling
  the test rows gives an interval for those trained models on new test rows. The metrics take the weights
  (util.task.weighted) so B resamples cost B weighted sums, not B sorts.
- main_evaluate.py (`resample_weights`, `refit_interval`): every probe is refitted on each resample's training
  rows and scored on its test rows (util/evaluate/crossval.py), so the interval also holds the training
  variability; see refit_interval for what it covers.
`task` arguments are util.task.tasks.Task objects or their names.
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


def refit_interval(values: np.ndarray, refs: np.ndarray | None = None, level: float = 0.95,
                   bounds: tuple[float, float] = (-np.inf, np.inf)) -> tuple[float, float, float]:
    """(point, low, high) from values [1 + B] (entry 0 on the rows, then B refitted resamples) or of the paired
    difference values - refs: the central `level` of the resamples' spread around their own mean, placed at the
    point. The refits learn from resamples in which about 37% of the rows are absent and others doubled, so their
    values sit lower than the point by a nearly constant amount; their spread is what carries the uncertainty.
    Clipped to `bounds` (the metric's range); nan without resamples."""
    v = np.asarray(values, np.float64) - (np.asarray(refs, np.float64) if refs is not None else 0.0)
    boots = v[1:][np.isfinite(v[1:])]
    if not len(boots):
        return float(v[0]), float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(boots, [tail, 100 - tail]) - boots.mean() + v[0]
    return float(v[0]), float(np.clip(lo, *bounds)), float(np.clip(hi, *bounds))


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
