"""Exact k-nearest neighbours of `main_evaluate.py`'s k-NN probe, for many nested training subsets at once, and
its distance-weighted votes (also under bootstrap copies of the training rows).

Neighbours are by Euclidean distance; equal distances are ordered by training row (the lower index first), so the
result does not depend on how the work is split. Every label fraction and draw of a fold is a subset of the same
training rows, standardised the same way, so one distance computation per fold serves them all.

Small problems: float64 distances (||b||^2 + ||a||^2 - 2 b.a, as scikit-learn computes them), fully sorted.
Large ones (1e10 multiply-adds and more; util/evaluate/knn_filter.py): float32 blocks from numpy's BLAS in
one-thread tiles (a tile per core: the same bytes whatever the thread count; torch does the exact, grouped top-k),
the precision scikit-learn's brute force has on float32 features, and a pool of each test row's nearest rows from
which the subsets of at least 10% of the rows take theirs.

Votes follow scikit-learn's KNeighborsClassifier(weights="distance"): weight 1/distance, and a query at distance
0 from training rows gets weight 1 from those rows only. Under bootstrap counts c (a resample holds training row j
c_j times) the k nearest copies vote: the walk down the candidate list takes min(c_j, copies still missing) of each.
"""
from __future__ import annotations

import numpy as np

LARGE = 1e10  # queries x training rows x features above which the float32 blocks of knn_filter.py are used


def _exact_rows(a: np.ndarray, b: np.ndarray, subsets, depth: int, out: list, rows: np.ndarray) -> None:
    """float64 distances of queries b[rows] to every training row, the `depth` nearest of each subset (stable
    order), written into out[s] = (idx [m, depth], d2 [m, depth])."""
    a64 = np.asarray(a, np.float64)
    na = np.einsum("ij,ij->i", a64, a64)
    step = max(1, int(2e7 // max(1, len(a))))
    for lo in range(0, len(rows), step):
        r = rows[lo:lo + step]
        b64 = np.asarray(b[r], np.float64)
        d2 = np.maximum(np.einsum("ij,ij->i", b64, b64)[:, None] + na[None] - 2 * (b64 @ a64.T), 0.0)
        for s, sub in enumerate(subsets):
            part = d2[:, sub]
            order = np.argsort(part, axis=1, kind="stable")[:, :depth]
            out[s][0][r, :order.shape[1]] = sub[order]
            out[s][1][r, :order.shape[1]] = np.take_along_axis(part, order, axis=1)


def neighbours(a: np.ndarray, b: np.ndarray, subsets: list[np.ndarray], depth: int,
               large: float = LARGE) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each subset (sorted indices into the training rows a [n, d]), the `depth` nearest of its rows to every
    query b [m, d]: (indices into a [m, depth], squared distances [m, depth]), nearest first; a subset with fewer
    rows is padded with index -1 and distance inf."""
    out = [(np.full((len(b), depth), -1, np.int64), np.full((len(b), depth), np.inf)) for _ in subsets]
    if float(len(a)) * len(b) * a.shape[1] < large:
        _exact_rows(a, b, subsets, depth, out, np.arange(len(b)))
        return out
    from util.evaluate.knn_filter import filtered_rows  # imports torch: only for large problems

    failed = filtered_rows(a, b, subsets, depth, out)
    if len(failed):
        _exact_rows(a, b, subsets, depth, out, failed)
    return out


def _inverse(d2: np.ndarray) -> np.ndarray:
    """1/distance, 0 for padding (inf) and inf for distance 0."""
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(d2)


def _weights(d2: np.ndarray, used: np.ndarray) -> np.ndarray:
    """scikit-learn's distance weights of the `used` neighbours (bool or counts): 1/distance, or, for a query
    with a used neighbour at distance 0, 1 for those at distance 0 and 0 for the others."""
    zero = (d2 == 0) & (used > 0)
    inv = _inverse(d2)
    return used * np.where(zero.any(axis=-1, keepdims=True), zero, np.where(np.isfinite(inv), inv, 0.0))


def votes(idx: np.ndarray, d2: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Distance-weighted votes of the k nearest: targets [n, K] (one-hot classes or values) -> [m, K], the
    weighted mean of the neighbours' targets (class probabilities, or a regression prediction)."""
    idx, d2 = idx[:, :k], d2[:, :k]
    w = _weights(d2, (idx >= 0).astype(np.float64))
    total = w.sum(1, keepdims=True)
    return np.einsum("mk,mkc->mc", w, targets[np.maximum(idx, 0)]) / np.where(total > 0, total, 1.0)


def resampled_votes(idx: np.ndarray, d2: np.ndarray, targets: np.ndarray, k: int, counts: np.ndarray) -> np.ndarray:
    """votes() when training row j is present counts[:, j] times (a bootstrap resample, [b, n]): the k nearest
    copies vote, each with its row's weight -> [b, m, K]. Walks the `depth` candidates of each query; a resample
    that leaves fewer than k copies among them uses the copies it has.

    With S_j the copies among the first j candidates, candidate j casts min(S_j, k) - min(S_j-1, k) votes, so the
    weighted sum of the targets is sum_j min(S_j, k) (a_j - a_j+1) with a_j = weight_j target_j: one cumulative
    sum and one matrix product per batch."""
    counts = np.asarray(counts)
    have = idx >= 0
    col = np.where(have, idx, counts.shape[1])  # padding reads a zero count
    zero = ((d2 == 0) & have).any(1)  # rows with a training row at distance 0 follow scikit-learn's rule
    inv = np.where(have & (d2 > 0), _inverse(np.where(d2 > 0, d2, 1.0)), 0.0)
    a = np.concatenate([inv[:, :, None] * targets[np.maximum(idx, 0)], inv[:, :, None]], axis=2)  # [m, depth, K+1]
    delta = (a - np.concatenate([a[:, 1:], np.zeros_like(a[:, :1])], axis=1)).astype(np.float32)
    totals = counts.sum(1, dtype=np.int64)
    out = np.empty((len(counts), len(idx), targets.shape[1]))
    step = max(1, int(8e6 // max(1, idx.size)))
    for lo in range(0, len(counts), step):
        cb = counts[lo:lo + step]
        rows_first = np.zeros((counts.shape[1] + 1, len(cb)), np.uint8)  # [n + 1, b]: copies, then padding
        rows_first[:-1] = np.minimum(cb, 255).T
        s = np.cumsum(np.take(rows_first, col, axis=0), axis=1, dtype=np.float32)  # [m, depth, b]
        np.minimum(s, np.minimum(k, totals[lo:lo + step]).astype(np.float32)[None, None], out=s)
        acc = np.matmul(s.transpose(0, 2, 1), delta)  # [m, b, K+1]
        den = acc[:, :, -1:]
        out[lo:lo + step] = (acc[:, :, :-1] / np.where(den > 0, den, 1.0)).transpose(1, 0, 2)
    if zero.any():  # distance 0: only the copies at distance 0 vote (1 each)
        rows = np.flatnonzero(zero)
        out[:, rows] = _walk(idx[rows], d2[rows], targets, k, counts)
    return out


def _walk(idx, d2, targets, k, counts):
    """resampled_votes by explicit copies, for the few rows where scikit-learn's distance-0 rule applies."""
    have = idx >= 0
    c = np.where(have[None], counts[:, np.maximum(idx, 0)], 0).astype(np.int64)  # [b, m, depth]
    total = np.cumsum(c, axis=2)
    k_eff = np.minimum(k, counts.sum(1, dtype=np.int64))[:, None, None]
    used = np.minimum(total, k_eff) - np.minimum(total - c, k_eff)
    w = _weights(d2[None], used)
    s = w.sum(2, keepdims=True)
    return np.einsum("bmd,mdc->bmc", w, targets[np.maximum(idx, 0)]) / np.where(s > 0, s, 1.0)
