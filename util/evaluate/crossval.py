"""One fold of `main_evaluate.py`'s cross-validation, every label fraction and draw of it at once: the probes
fitted on the labelled training rows, their metrics on the fold's test rows, and the same after each bootstrap
resample (every probe refitted on its resampled training rows, scored on the resampled test rows).

Features are standardised with the statistics of the fold's training rows (all of them: their features, never
their labels, are what a label-efficiency study has), so every fraction and draw of a fold shares one scaling
and, for k-NN, one distance computation.
"""
from __future__ import annotations

import math

import numpy as np

from util.evaluate import knn
from util.evaluate.metrics import resample_metrics
from util.evaluate.probe import Fitted, standardised, standardiser

BATCH = 64  # resamples refitted together


def knn_depth(knn_k: int) -> int:
    """Candidates kept per test row: enough that a resample (about 37% of rows absent, others doubled) still
    finds its k nearest copies among them (short of that, it votes with the copies it has)."""
    return knn_k + math.ceil(4 * math.sqrt(knn_k)) + 4


def _standardised_fold(x, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fold's training and test features, standardised with the training rows' statistics."""
    xt = np.asarray(x[train], np.float32)
    mean, scale = standardiser(xt)
    return standardised(xt, mean, scale), standardised(x[test], mean, scale)


def fold_neighbours(features, train: np.ndarray, test: np.ndarray, labelled: dict, knn_k: int) -> dict:
    """{(fraction, draw): (idx, d2)} for one fold: the knn_depth(k) nearest labelled rows of every test row
    (indices into the labelled rows, -1 for padding; squared distances), one distance computation for every
    fraction and draw. Threaded (util/evaluate/knn_filter.py): run it in a process that has the cores."""
    x = np.load(features, mmap_mode="r") if isinstance(features, str) else features
    a, b = _standardised_fold(x, train, test)
    keys = sorted(labelled)
    pos = {key: np.searchsorted(train, labelled[key]) for key in keys}
    found = knn.neighbours(a, b, [pos[k] for k in keys], min(knn_depth(knn_k), len(train)))
    local, lists = np.full(len(train), -1, np.int64), {}
    for key, (idx, d2) in zip(keys, found):
        local[pos[key]] = np.arange(len(pos[key]))
        lists[key] = (np.where(idx >= 0, local[idx], -1), d2)
        local[pos[key]] = -1
    return lists


def fold_job(features, train: np.ndarray, test: np.ndarray, y: np.ndarray, groups: np.ndarray | None,
             labelled: dict, protocol: str, task, n_out: int, names, seed: int, knn_k: int, max_rows: int,
             counts=None, neighbours=None) -> dict:
    """{(fraction, draw): ({metric: [1 + R]}, labelled rows)} for one fold: entry 0 the metrics of the probes
    fitted on the labelled rows, entries 1..R those under the R resamples of `counts` ([R, n] copies of every
    row; None: no resamples). `features` and `counts` may be .npy paths (read memory-mapped by worker
    processes); `labelled` maps (fraction, draw) to the sorted labelled rows (a subset of `train`). k-NN votes
    with the lists of fold_neighbours(): `neighbours` is the .npz path (`idx`, `d2`) main_evaluate.py wrote for
    the one draw in `labelled`, or None to find them here for every draw."""
    counts = np.load(counts, mmap_mode="r") if isinstance(counts, str) else counts
    keys = sorted(labelled)
    if protocol == "knn":
        if neighbours is None:
            neighbours = fold_neighbours(features, train, test, labelled, knn_k)
        else:
            if len(keys) != 1:
                raise ValueError("a k-NN fold job reads the lists of one fraction and draw")
            with np.load(neighbours) as z:
                neighbours = {keys[0]: (z["idx"], z["d2"])}
        a = b = None  # the votes need neither the features nor the test rows' values
    else:
        x = np.load(features, mmap_mode="r") if isinstance(features, str) else features
        a, b = _standardised_fold(x, train, test)
    pos = {key: np.searchsorted(train, labelled[key]) for key in keys}
    y_test, out = y[test], {}
    for key in keys:
        p = pos[key]
        rows = train[p]
        fit = Fitted(protocol, task, None if a is None else a[p], y[rows], b, n_out, seed, knn_k, max_rows,
                     None if groups is None else groups[rows], None if neighbours is None else neighbours[key])
        ones = np.ones((1, len(p)))
        parts = [resample_metrics(task, y_test, fit.scores[None], fit.decide(fit.scores[None], ones),
                                  np.ones((1, len(test))), names)]
        for lo in range(0, 0 if counts is None else len(counts), BATCH):
            cb = np.asarray(counts[lo:lo + BATCH])
            c_train, c_test = cb[:, rows].astype(np.float64), cb[:, test].astype(np.float64)
            scores = fit.resampled(c_train)
            parts.append(resample_metrics(task, y_test, scores, fit.decide(scores, c_train), c_test, names))
        out[key] = ({m: np.concatenate([q[m] for q in parts]) for m in parts[0]}, len(p))
    return out
