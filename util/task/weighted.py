"""Weighted metrics: each takes row weights w [B, n], so a bootstrap resample of the rows is one row of a weight
matrix (how many times each row was drawn) and B resamples cost B weighted sums, not B sorts: the scores are
sorted once. The point estimate is w = 1. Weighted AUROC, balanced accuracy, MAE and R^2 equal scikit-learn's
with `sample_weight` (tests/test_evaluate.py). The tasks (util.task.tasks) pick the ones that fit them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


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


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Mean recall over the classes present (weight > 0): y, pred int [n], w [B, n] -> [B]."""
    truth = (y[:, None] == np.arange(k)).astype(w.dtype)  # [n, k]
    sums = (w @ np.concatenate([truth, truth * (pred == y)[:, None]], axis=1)).astype(np.float64)  # [B, 2k]
    total, hit = sums[:, :k], sums[:, k:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return nanmean((np.where(total > 0, hit / np.where(total > 0, total, 1.0), np.nan)).T)


def nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the finite values; nan where there are none (no warning)."""
    finite = np.isfinite(values)
    n = finite.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(finite, values, 0.0).sum(0) / np.maximum(n, 1), np.nan)


def regression(y: np.ndarray, scores: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """'mae' and 'r2' (means over the target columns) of values y [n] or [n, K] under weights w [B, n]."""
    yy, sc = y.reshape(len(y), -1), scores.reshape(len(y), -1)
    tot = w.sum(1, keepdims=True)
    err = np.abs(yy - sc)  # [n, K]
    out = {"mae": (w @ err).mean(1) / tot[:, 0]}
    yc = yy - yy.mean(0)  # centred first: the weighted variance below then has no cancellation
    mean = (w @ yc) / tot  # [B, K]
    ss_res = w @ (err ** 2)
    ss_tot = w @ (yc ** 2) - tot * mean ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        out["r2"] = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), np.nan).mean(1)
    return out


def binary(y: np.ndarray, scores: np.ndarray, pred: np.ndarray | None, w: np.ndarray) -> dict[str, np.ndarray]:
    """'auroc' of the positive class (scores [n] or [n, 2]) and, with pred [n], 'balanced_accuracy'."""
    pos = scores[:, -1] if scores.ndim == 2 else scores
    out = {"auroc": weighted_auroc(y == 1, pos, w)}
    if pred is not None:
        out["balanced_accuracy"] = balanced_accuracy(y, np.asarray(pred), w, 2)
    return out


def classes(truth: list[np.ndarray], scores: np.ndarray, y: np.ndarray | None, pred: np.ndarray | None,
            w: np.ndarray, names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """One-vs-rest per class (y: class indices [n], pred [n]) or per label (y None, pred 0/1 [n, K]): truth[j] bool
    [n] is column j's positives. 'auroc' (macro over the columns with both kinds of rows), 'auroc_<name>', and
    with pred 'balanced_accuracy' (multi-class; multi-label: the mean over labels)."""
    per = np.stack([weighted_auroc(t, scores[:, j], w) for j, t in enumerate(truth)])
    out = {"auroc": nanmean(per)}
    for j, name in enumerate(names):
        out[f"auroc_{name}"] = per[j]
    if pred is not None:
        pred = np.asarray(pred)
        if y is not None:
            out["balanced_accuracy"] = balanced_accuracy(y, pred, w, scores.shape[1])
        else:
            out["balanced_accuracy"] = nanmean(np.stack([
                balanced_accuracy(truth[j].astype(int), pred[:, j].astype(int), w, 2)
                for j in range(scores.shape[1])]))
    return out
