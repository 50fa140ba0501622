"""One fold of `main_evaluate.py`'s cross-validation, every label fraction and draw of it at once: the probes
fitted on the labelled training rows, their metrics on the fold's test rows, and the same after each bootstrap
resample (every probe refitted on its resampled training rows, scored on the resampled test rows).

Features are standardised with the statistics of the fold's training rows (all of them: their features, never
their labels, are what a label-efficiency study has), so every fraction and draw of a fold shares one scaling
and, for k-NN, one distance computation.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from util.evaluate import knn
from util.evaluate.metrics import resample_metrics
from util.evaluate.probe import Fitted, standardised, standardiser

BATCH = 64  # resamples refitted together


def knn_depth(knn_k: int) -> int:
    """Candidates kept per test row: enough that a resample (about 37% of rows absent, others doubled) still
    finds its k nearest copies among them (short of that, it votes with the copies it has)."""
    return knn_k + math.ceil(4 * math.sqrt(knn_k)) + 4


def thread_budget() -> int:
    """Cores this process may use: 1 in a worker of a multi-process joblib run (it sets OMP_NUM_THREADS), all of
    this process's CPUs in the main process."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(os.environ.get("OMP_NUM_THREADS") or cpus))


def even_processes(jobs: int, work: int) -> int:
    """The process count, at most `jobs`, that leaves the fewest idle slots in the last round of `work` equal
    jobs (the larger on a tie): 5 k-NN folds on --jobs 2 run in this process, threaded, rather than in 3 rounds
    of 2 processes with one idle in the last (measured at 100,000 x 1,024: 8% faster)."""
    return min(range(1, max(1, min(jobs, work)) + 1), key=lambda j: (math.ceil(work / j) * j - work, -j))


def fold_job(features, train: np.ndarray, test: np.ndarray, y: np.ndarray, groups: np.ndarray | None,
             labelled: dict, protocol: str, task, n_out: int, names, seed: int, knn_k: int, max_rows: int,
             counts=None) -> dict:
    """{(fraction, draw): ({metric: [1 + R]}, labelled rows)} for one fold: entry 0 the metrics of the probes
    fitted on the labelled rows, entries 1..R those under the R resamples of `counts` ([R, n] copies of every
    row; None: no resamples). `features` and `counts` may be .npy paths (read memory-mapped by worker
    processes); `labelled` maps (fraction, draw) to the sorted labelled rows (a subset of `train`). k-NN uses
    every core of the process's thread budget: the distance blocks, and the resample batches one per thread."""
    threads = thread_budget()
    x = np.load(features, mmap_mode="r") if isinstance(features, str) else features
    counts = np.load(counts, mmap_mode="r") if isinstance(counts, str) else counts
    xt = np.asarray(x[train], np.float32)
    mean, scale = standardiser(xt)
    a, b = standardised(xt, mean, scale), standardised(x[test], mean, scale)
    del xt
    keys = sorted(labelled)
    pos = {key: np.searchsorted(train, labelled[key]) for key in keys}
    lists = {}
    if protocol == "knn":
        found = knn.neighbours(a, b, [pos[k] for k in keys], min(knn_depth(knn_k), len(train)))
        local = np.full(len(train), -1, np.int64)
        for key, (idx, d2) in zip(keys, found):  # indices into the labelled rows, -1 for padding
            local[pos[key]] = np.arange(len(pos[key]))
            lists[key] = (np.where(idx >= 0, local[idx], -1), d2)
            local[pos[key]] = -1
    y_test, out = y[test], {}
    for key in keys:
        p = pos[key]
        rows = train[p]
        fit = Fitted(protocol, task, a[p], y[rows], b, n_out, seed, knn_k, max_rows,
                     None if groups is None else groups[rows], lists.get(key))
        ones = np.ones((1, len(p)))
        parts = [resample_metrics(task, y_test, fit.scores[None], fit.decide(fit.scores[None], ones),
                                  np.ones((1, len(test))), names)]

        def batch(lo: int, fit=fit, rows=rows) -> dict:
            cb = np.asarray(counts[lo:lo + BATCH])
            c_train, c_test = cb[:, rows].astype(np.float64), cb[:, test].astype(np.float64)
            scores = fit.resampled(c_train)
            return resample_metrics(task, y_test, scores, fit.decide(scores, c_train), c_test, names)

        starts = range(0, 0 if counts is None else len(counts), BATCH)
        if protocol == "knn" and threads > 1 and len(starts) > 1:  # numpy's votes and metrics, one batch a thread
            with ThreadPoolExecutor(threads) as pool:
                parts += list(pool.map(batch, starts))
        else:
            parts += [batch(lo) for lo in starts]
        out[key] = ({m: np.concatenate([q[m] for q in parts]) for m in parts[0]}, len(p))
    return out
