"""Stratified folds that keep groups apart, in the time a 100,000-row table needs.

The assignment is scikit-learn's StratifiedGroupKFold(shuffle=True) to the fold, so existing folds do not move:
groups are shuffled with a RandomState(seed), sorted (stably) by how uneven their class counts are, and each goes
to the fold that leaves the per-class proportions most even (the mean over classes of the standard deviation
across folds; a score within numpy's isclose of the best goes to the fold with fewer rows). scikit-learn scores
the k candidate folds of every group in k separate numpy calls (50,000 patient groups: about 30 s); here the k
candidates are one array, with the same arithmetic in the same order, so the scores and the folds are identical
(tests/test_evaluate_folds.py compares them with scikit-learn's).
"""
from __future__ import annotations

import numpy as np


def _is_close(a: float, b: float) -> bool:
    """numpy.isclose(a, b) with its default tolerances, for two floats."""
    return a == b or (np.isfinite(b) and abs(a - b) <= 1e-8 + 1e-5 * abs(b))


def stratified_group_folds(strata: np.ndarray, groups: np.ndarray, folds: int,
                           seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) row indices of `folds` folds, no group in two, class proportions as even as the groups
    allow."""
    _, y_inv, y_cnt = np.unique(strata, return_inverse=True, return_counts=True)
    _, g_inv, g_cnt = np.unique(groups, return_inverse=True, return_counts=True)
    per_group = np.zeros((len(g_cnt), len(y_cnt)))
    np.add.at(per_group, (g_inv.ravel(), y_inv.ravel()), 1)
    perm = np.arange(len(g_cnt))
    np.random.RandomState(seed).shuffle(perm)
    per_group = per_group[perm]
    shuffled = np.empty_like(perm)
    shuffled[perm] = np.arange(len(perm))
    g_inv = shuffled[g_inv.ravel()]
    per_fold = np.zeros((folds, len(y_cnt)))
    fold_of = np.empty(len(g_cnt), np.int64)
    candidates = np.eye(folds)[:, :, None]  # candidate i adds the group to fold i
    for g in np.argsort(-np.std(per_group, axis=1), kind="stable"):
        trial = per_fold[None] + candidates * per_group[g]  # [candidate, fold, class]
        scores = np.mean(np.std(trial / y_cnt, axis=1), axis=1)
        sizes = np.sum(per_fold, axis=1)
        best, best_score, best_size = 0, np.inf, np.inf
        for i in range(folds):
            score = float(scores[i])
            if score < best_score or (_is_close(score, best_score) and sizes[i] < best_size):
                best, best_score, best_size = i, score, sizes[i]
        per_fold[best] += per_group[g]
        fold_of[g] = best
    row_fold = fold_of[g_inv]
    return [(np.flatnonzero(row_fold != i), np.flatnonzero(row_fold == i)) for i in range(folds)]
