"""Metrics of one fold's test rows under many bootstrap resamples whose probes were refitted, so that every
resample has its own predictions: scores [B, m, K] and row weights w [B, m] -> {metric: [B]}.

The same definitions as util.task.weighted (equal to scikit-learn's with sample_weight; ties in a score count one
half): AUROC per class or label and their macro mean over the columns with both kinds of rows, balanced accuracy
(mean recall over the classes present), MAE and R^2. Resample 0 with w = 1 is the point estimate.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from util.task.weighted import nanmean


def auroc_rows(y: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC of positives y (bool [m]) for each row of scores [B, m] under weights w [B, m] -> [B] (nan where a
    class has no weight). Tied scores count one half (Mann-Whitney)."""
    order = np.argsort(scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, axis=1)
    yy = np.asarray(y, bool)[order]
    ww = np.take_along_axis(np.asarray(w, np.float64), order, axis=1)
    wneg = np.where(yy, 0.0, ww)
    wpos = ww - wneg
    cneg = np.concatenate([np.zeros((len(s), 1)), np.cumsum(wneg, axis=1)], axis=1)  # negatives before position
    new = np.concatenate([np.ones((len(s), 1), bool), s[:, 1:] != s[:, :-1]], axis=1)
    if new.all():
        num = (wpos * cneg[:, :-1]).sum(1)
    else:  # a positive counts the negatives below its tie run and half of those inside it
        pos = np.arange(s.shape[1])
        first = np.maximum.accumulate(np.where(new, pos, 0), axis=1)
        ends = np.concatenate([new[:, 1:], np.ones((len(s), 1), bool)], axis=1)
        last = np.minimum.accumulate(np.where(ends, pos, s.shape[1] - 1)[:, ::-1], axis=1)[:, ::-1]
        below = np.take_along_axis(cneg, first, axis=1)
        through = np.take_along_axis(cneg, last + 1, axis=1)
        num = (wpos * 0.5 * (below + through)).sum(1)
    den = wpos.sum(1) * cneg[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def balanced_accuracy_rows(y: np.ndarray, pred: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Mean recall over the classes with weight: y [m], pred [B, m] class indices, w [B, m] -> [B]."""
    onehot = (np.asarray(y)[:, None] == np.arange(k)).astype(np.float64)  # [m, k]
    total = np.asarray(w, np.float64) @ onehot
    hit = (np.asarray(w, np.float64) * (pred == np.asarray(y)[None])) @ onehot
    with np.errstate(invalid="ignore", divide="ignore"):
        return nanmean(np.where(total > 0, hit / np.where(total > 0, total, 1.0), np.nan).T)


def regression_rows(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """'mae' and 'r2' (means over the target columns) of y [m, K] and predictions [B, m, K] under w [B, m]."""
    y = y.reshape(len(y), -1)
    w = np.asarray(w, np.float64)
    tot = w.sum(1)[:, None]
    err = np.abs(pred - y[None])  # [B, m, K]
    yc = y - y.mean(0)
    mean = (w @ yc) / tot
    ss_res = np.einsum("bm,bmk->bk", w, err ** 2)
    ss_tot = w @ (yc ** 2) - tot * mean ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), np.nan).mean(1)
        return {"mae": np.einsum("bm,bmk->b", w, err) / tot[:, 0] / y.shape[1], "r2": r2}


def resample_metrics(task, y: np.ndarray, scores: np.ndarray, pred: np.ndarray | None, w: np.ndarray,
                     names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Every metric of `task` (a util.task.tasks.Task) for each resample: y as main_evaluate.py holds it (class
    indices [m], 0/1 [m, K], values [m, K]); scores [B, m, K] (probabilities or predicted values); pred [B, m] or
    [B, m, K] (multi-label 0/1) or None; w [B, m]."""
    if task.continuous:
        return regression_rows(y, scores, w)
    if task.multi_label:
        per = np.stack([auroc_rows(y[:, j] == 1, scores[:, :, j], w) for j in range(scores.shape[2])])
        out = {"auroc": nanmean(per), **{f"auroc_{n}": per[j] for j, n in enumerate(names)}}
        if pred is not None:
            out["balanced_accuracy"] = nanmean(np.stack([
                balanced_accuracy_rows(y[:, j], pred[:, :, j], w, 2) for j in range(scores.shape[2])]))
        return out
    k = scores.shape[2]
    if k == 2:
        out = {"auroc": auroc_rows(y == 1, scores[:, :, 1], w)}
    else:
        per = np.stack([auroc_rows(y == c, scores[:, :, c], w) for c in range(k)])
        out = {"auroc": nanmean(per), **{f"auroc_{n}": per[j] for j, n in enumerate(names)}}
    if pred is not None:
        out["balanced_accuracy"] = balanced_accuracy_rows(y, pred, w, k)
    return out
