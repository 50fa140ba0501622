"""Metrics of frozen-embedding probes and their bootstrap intervals: the one bootstrap of the repository
(main_evaluate.py and bench/lidc_transfer.py use it).

Every metric takes row weights, so a resample of the test rows is one row of a weight matrix W [B, n] (how many
times each row was drawn) and B resamples cost B weighted sums, not B sorts: the scores are sorted once. The
point estimate is W = 1. Weighted AUROC, balanced accuracy, MAE and R^2 equal scikit-learn's with
`sample_weight` (tests/test_evaluate.py checks it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

TASKS = ("binary", "multiclass", "multilabel", "regression")
PRIMARY = {"binary": "auroc", "multiclass": "auroc", "multilabel": "auroc", "regression": "r2"}
HEADLINE = {"binary": ("auroc", "balanced_accuracy"), "multiclass": ("auroc", "balanced_accuracy"),
            "multilabel": ("auroc", "balanced_accuracy"), "regression": ("r2", "mae")}


@dataclass
class Run:
    """The out-of-fold predictions of one probe on the test rows.

    scores: [n, K] class probabilities (binary: K = 2, or a 1-D score of the positive class), multi-label [n, K]
        probabilities, regression [n, K] predicted values. pred: [n] class indices, [n, K] 0/1 for multi-label,
        None for regression (or when only AUROC is wanted)."""
    scores: np.ndarray
    pred: np.ndarray | None = None


def weighted_auroc(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC of a binary problem under each row of weights: y bool [n], score [n], w [B, n] -> [B] (nan where a
    class has no weight). Tied scores count one half, as in the Mann-Whitney statistic."""
    order = np.argsort(score, kind="stable")
    s, yy = score[order], np.asarray(y, bool)[order]
    new_run = np.r_[True, s[1:] != s[:-1]]
    first = np.maximum.accumulate(np.where(new_run, np.arange(len(s)), 0))  # first row of each row's tie run
    last = np.r_[np.flatnonzero(new_run)[1:], len(s)]  # one past the last row of each tie run ...
    last = last[np.cumsum(new_run) - 1]  # ... for each row
    ws = w[:, order]
    neg = np.concatenate([np.zeros((len(ws), 1), ws.dtype), np.cumsum(np.where(yy, 0, ws), axis=1)], axis=1)
    wpos = np.where(yy, ws, 0)
    if new_run.all():  # no ties: a positive row counts the negative weight below it
        num = (wpos * neg[:, :-1]).sum(1, dtype=np.float64)
    else:  # a positive row counts the negative weight below its tie run plus half of that inside it
        rows = np.flatnonzero(yy)
        num = (ws[:, rows] * 0.5 * (neg[:, first[rows]].astype(np.float64) + neg[:, last[rows]])).sum(1)
    den = wpos.sum(1, dtype=np.float64) * neg[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Mean recall over the classes present (weight > 0): y, pred int [n], w [B, n] -> [B]."""
    truth = (y[:, None] == np.arange(k)).astype(w.dtype)  # [n, k]
    sums = (w @ np.concatenate([truth, truth * (pred == y)[:, None]], axis=1)).astype(np.float64)  # [B, 2k]
    total, hit = sums[:, :k], sums[:, k:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return _nanmean((np.where(total > 0, hit / np.where(total > 0, total, 1.0), np.nan)).T)


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the finite values; nan where there are none (no warning)."""
    finite = np.isfinite(values)
    n = finite.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(finite, values, 0.0).sum(0) / np.maximum(n, 1), np.nan)


def weighted_metrics(task: str, y: np.ndarray, run: Run, w: np.ndarray,
                     names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Every metric of `run` against `y` under each row of weights w [B, n] -> {name: [B]}.

    y: class indices [n] (binary, multiclass), 0/1 [n, K] (multilabel), values [n, K] (regression).
    Classification: 'auroc' (macro over classes/labels with both kinds of rows), 'auroc_<name>' per class or
    label (multiclass, multilabel), 'balanced_accuracy' (when run.pred is given; multilabel: mean over labels).
    Regression: 'mae' and 'r2' (means over the target columns)."""
    w = np.atleast_2d(np.asarray(w))  # float32 counts are exact: sums stay below 2^24
    scores = np.asarray(run.scores, np.float64)
    out: dict[str, np.ndarray] = {}
    if task == "regression":
        yy = np.asarray(y, np.float64).reshape(len(y), -1)
        sc = scores.reshape(len(y), -1)
        tot = w.sum(1, keepdims=True)
        err = np.abs(yy - sc)  # [n, K]
        out["mae"] = (w @ err).mean(1) / tot[:, 0]
        yc = yy - yy.mean(0)  # centred first: the weighted variance below then has no cancellation
        mean = (w @ yc) / tot  # [B, K]
        ss_res = w @ (err ** 2)
        ss_tot = w @ (yc ** 2) - tot * mean ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            out["r2"] = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), np.nan).mean(1)
        return out
    if task == "binary":
        pos = scores[:, -1] if scores.ndim == 2 else scores
        out["auroc"] = weighted_auroc(np.asarray(y) == 1, pos, w)
        if run.pred is not None:
            out["balanced_accuracy"] = _balanced_accuracy(np.asarray(y), np.asarray(run.pred), w, 2)
        return out
    truth = [np.asarray(y) == c for c in range(scores.shape[1])] if task == "multiclass" else \
        [np.asarray(y)[:, j] == 1 for j in range(scores.shape[1])]
    per = np.stack([weighted_auroc(t, scores[:, j], w) for j, t in enumerate(truth)])
    out["auroc"] = _nanmean(per)
    for j, name in enumerate(names):
        out[f"auroc_{name}"] = per[j]
    if run.pred is not None:
        if task == "multiclass":
            out["balanced_accuracy"] = _balanced_accuracy(np.asarray(y), np.asarray(run.pred), w, scores.shape[1])
        else:
            out["balanced_accuracy"] = _nanmean(np.stack([
                _balanced_accuracy(truth[j].astype(int), np.asarray(run.pred)[:, j].astype(int), w, 2)
                for j in range(scores.shape[1])]))
    return out


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


def bootstrap_values(task: str, y: np.ndarray, runs: Sequence[Run], n_boot: int = 1000, seed: int = 0,
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


def bootstrap(task: str, y: np.ndarray, runs: Sequence[Run], refs: Sequence[Run] | None = None,
              n_boot: int = 1000, seed: int = 0, groups: np.ndarray | None = None, names: Sequence[str] = (),
              level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """Each metric's mean over `runs` (several label draws scored on the same rows), or, with `refs` (one per
    run, paired), the mean of run - ref, as (point, low, high) over `n_boot` resamples shared by every run and
    reference."""
    vals = bootstrap_values(task, y, [*runs, *(refs or [])], n_boot, seed, groups, names)
    mine, theirs = vals[:len(runs)], vals[len(runs):]
    return {m: interval([v[m] for v in mine], [v[m] for v in theirs] if refs is not None else None, level)
            for m in mine[0]}
