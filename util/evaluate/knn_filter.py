"""The large-problem path of util/evaluate/knn.py (torch; imported only for problems of 1e10 multiply-adds and
more): one float32 distance block per group of test rows, shared by every subset.

Squared distances are ||b||^2 + ||a||^2 - 2 b.a with the products a float32 matrix product; the few that
cancel (near-duplicates, below 1e-3 of the norms) are recomputed in float64, so distances match scikit-learn's
(which computes float32 input in float64) up to float32 rounding. For each test row the P nearest rows of
the whole training set are kept in order (a pool); a subset holding at least 5% of the rows takes its `depth`
nearest members from the pool (the pool is P = 2 depth / fraction deep, so this almost always suffices, and a row
for which it does not is searched in the subset itself), a smaller subset is searched directly. Equal distances
are ordered by training row.
"""
from __future__ import annotations

import math

import numpy as np
import torch

POOLED = 0.2  # subsets with at least this share of the training rows are served from the pool


def _in_row_order(idx: torch.Tensor, d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows already sorted by distance (topk), with equal distances put in training-row order."""
    tied = torch.nonzero((d2[:, 1:] == d2[:, :-1]).any(1))[:, 0]
    if len(tied):
        i, v = idx[tied], d2[tied]
        by_row = torch.argsort(i, dim=1, stable=True)
        i, v = i.gather(1, by_row), v.gather(1, by_row)
        order = torch.argsort(v, dim=1, stable=True)
        idx, d2 = idx.clone(), d2.clone()
        idx[tied], d2[tied] = i.gather(1, order), v.gather(1, order)
    return idx, d2


def _nearest(d2: torch.Tensor, rows: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `depth` nearest columns of d2 [q, c] (columns are training rows `rows` [c]), ties in row order."""
    take = min(depth, d2.shape[1])
    extra = 1 if take < d2.shape[1] else 0
    vals, pos = torch.topk(d2, take + extra, dim=1, largest=False, sorted=True)
    idx, vals = _in_row_order(rows[pos], vals)
    cut = torch.nonzero(vals[:, -1] == vals[:, take - 1])[:, 0] if extra else []
    for r in cut.tolist() if len(cut) else []:  # a tie across the cut: the lower training rows win
        same = torch.nonzero(d2[r] == vals[r, take - 1])[:, 0]
        keep = rows[same].sort().values
        inside = int((vals[r, :take] < vals[r, take - 1]).sum())
        idx[r, inside:take] = keep[:take - inside]
    return idx[:, :take], vals[:, :take]


def _near_exact(idx, dd, q, A, nq, na_max, rel: float = 1e-3):
    """Recompute in float64, as differences, the distances that float32 cannot resolve: those below `rel` of the
    norms, where ||b||^2 + ||a||^2 - 2 b.a cancels (a scan embedded twice: distance 0, which decides the votes)."""
    close = dd < rel * (nq[:, None] + na_max)
    if not bool(close.any()):
        return idx, dd.double()
    dd = dd.double()
    r, c = torch.nonzero(close, as_tuple=True)
    diff = q[r].double() - A[idx[r, c]].double()
    dd[r, c] = (diff * diff).sum(1)
    rows = torch.unique(r)
    order = torch.argsort(dd[rows], dim=1, stable=True)  # recomputed distances may reorder the row
    idx[rows], dd[rows] = _in_row_order(idx[rows].gather(1, order), dd[rows].gather(1, order))
    return idx, dd


def filtered_rows(a: np.ndarray, b: np.ndarray, subsets: list[np.ndarray], depth: int, out: list,
                  block_bytes: float = 2e8) -> np.ndarray:
    """Fill out[s] = (idx, d2) for every query row of b; returns the rows left to the exact path (none: the
    pool's shortfalls are searched here). a [n, d], b [m, d] float32; subsets: sorted indices into a."""
    a_np, b_np = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    A, B = torch.from_numpy(a_np), torch.from_numpy(b_np)
    na, nb = (A.double() ** 2).sum(1).float(), (B.double() ** 2).sum(1).float()
    na_max, n = float(na.max()), len(a)
    subs = [torch.from_numpy(np.asarray(s, np.int64)) for s in subsets]
    pooled = [s for s, sub in enumerate(subs) if len(sub) >= POOLED * n]
    pool = min(n, max([depth] + [math.ceil(2 * depth * n / len(subs[s])) for s in pooled]))
    member = {}
    for s in pooled:
        member[s] = torch.zeros(n, dtype=torch.bool)
        member[s][subs[s]] = True
    everything = torch.arange(n)
    step = max(1, int(block_bytes // (4 * max(1, n))))
    for lo in range(0, len(b), step):
        hi = min(len(b), lo + step)
        # the product by numpy's BLAS (OpenBLAS: about 1.2x torch's CPU GEMM on the development VM's cores)
        d2 = torch.from_numpy(b_np[lo:hi] @ a_np.T).mul_(-2).add_(na[None]).add_(nb[lo:hi, None]).clamp_min_(0)
        if pooled:
            pidx, pd2 = _nearest(d2, everything, pool)
        for s, sub in enumerate(subs):
            if s in member:
                m = member[s][pidx]  # [q, pool], nearest first
                short = m.sum(1) < min(depth, len(sub))
                first = torch.topk(m.float() * (pool - torch.arange(pool, dtype=torch.float32)),
                                   min(depth, pool), dim=1).indices.sort(dim=1).values  # earliest members
                idx, dd = pidx.gather(1, first), pd2.gather(1, first)
                if bool(short.any()):  # too few members among the pool's rows: search the subset itself
                    rows = torch.nonzero(short)[:, 0]
                    idx[rows], dd[rows] = _nearest(d2[rows].index_select(1, sub), sub, depth)
            else:
                idx, dd = _nearest(d2 if len(sub) == n else d2.index_select(1, sub), sub, depth)
            idx, dd = _near_exact(idx, dd, B[lo:hi], A, nb[lo:hi], na_max)
            k = idx.shape[1]
            out[s][0][lo:hi, :k] = idx.numpy()
            out[s][1][lo:hi, :k] = dd.numpy()
    return np.zeros(0, np.int64)
