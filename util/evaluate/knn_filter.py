"""The large-problem path of util/evaluate/knn.py (torch; imported only for problems of 1e10 multiply-adds and
more): one float32 block per group of test rows, shared by every subset.

The block is one matrix product of augmented rows: [-b, 1] . [a, ||a||^2 / 2] = ||a||^2 / 2 - b.a, which orders
the training rows as the squared distance ||b||^2 + ||a||^2 - 2 b.a does (||b||^2 is the same along a row), so no
pass over the block is spent on norms; the kept entries become distances in float64. The few that cancel
(near-duplicates, below 1e-3 of the norms) are recomputed in float64 as differences, so distances match
scikit-learn's (which computes float32 input in float64) up to float32 rounding.

For each test row the P nearest rows of the whole training set are kept in order (a pool); a subset holding at
least 10% of the rows takes its `depth` nearest members from the pool (the pool is P = 1.5 depth / fraction deep,
so this almost always suffices, and a row for which it does not is searched in the subset itself), a smaller
subset is searched directly. Equal distances are ordered by training row.

The k smallest entries of a row are found without a top-k over the whole row (_smallest): the columns are split
into strided groups, and only the k groups with the smallest minima can hold them. If u is a group left out, the
k chosen groups' minima are k entries no larger than u's minimum, so everything in u is at least the k-th
smallest chosen entry: the k smallest values are all among the chosen groups, and an entry left out can only
equal the k-th (a tie across the cut, which _nearest resolves on the whole row).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import threadpool_limits

POOLED = 0.1  # subsets with at least this share of the training rows are served from the pool
MARGIN = 1.5  # the pool holds MARGIN x depth members of such a subset on average (short of depth: 0.3% of rows)
ALIGN = 16  # augmented rows are padded to a multiple of this many floats (the product runs faster aligned)


def _smallest(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) of the k smallest entries of each row of t [q, c], sorted (equal values in any order);
    exact, by way of the k strided column groups with the smallest minima (see the module's docstring)."""
    q, c = t.shape
    size = 16 if c >= 128 * k else 8 if c >= 64 * k else 1  # columns a group (measured best at 1,250 x 80,000)
    groups = c // size
    if size == 1 or not t.is_contiguous():
        return torch.topk(t, k, dim=1, largest=False, sorted=True)
    view = t[:, :groups * size].view(q, size, groups)  # group j: columns j, j + groups, j + 2 groups, ...
    chosen = torch.topk(view.amin(1), k, dim=1, largest=False, sorted=False).indices  # [q, k]
    cand = view.gather(2, chosen[:, None, :].expand(q, size, k)).view(q, -1)  # [q, size k]: size-major
    if groups * size < c:  # the last columns belong to no group: always candidates
        cand = torch.cat([cand, t[:, groups * size:]], 1)
    vals, pos = torch.topk(cand, k, dim=1, largest=False, sorted=True)
    inside = pos < size * k
    cols = torch.where(inside, chosen.gather(1, (pos % k) * inside) + groups * (pos // k),
                       pos - size * k + groups * size)
    return vals, cols


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


def _nearest(t: torch.Tensor, rows: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `depth` smallest columns of t [q, c] (columns are training rows `rows` [c]), ties in row order."""
    take = min(depth, t.shape[1])
    extra = 1 if take < t.shape[1] else 0
    vals, pos = _smallest(t, take + extra)
    idx, vals = _in_row_order(rows[pos], vals)
    cut = torch.nonzero(vals[:, -1] == vals[:, take - 1])[:, 0] if extra else []
    for r in cut.tolist() if len(cut) else []:  # a tie across the cut: the lower training rows win
        same = torch.nonzero(t[r] == vals[r, take - 1])[:, 0]
        keep = rows[same].sort().values
        inside = int((vals[r, :take] < vals[r, take - 1]).sum())
        idx[r, inside:take] = keep[:take - inside]
    return idx[:, :take], vals[:, :take]


def _near_exact(idx, dd, q, A, nq, na_max, rel: float = 1e-3):
    """Recompute in float64, as differences, the distances that float32 cannot resolve: those below `rel` of the
    norms, where ||b||^2 + ||a||^2 - 2 b.a cancels (a scan embedded twice: distance 0, which decides the votes)."""
    close = dd < rel * (nq[:, None] + na_max)
    if not bool(close.any()):
        return idx, dd
    r, c = torch.nonzero(close, as_tuple=True)
    diff = q[r].numpy().astype(np.float64) - A[idx[r, c]].numpy()
    dd[r, c] = torch.from_numpy(np.einsum("ij,ij->i", diff, diff))  # one thread: the same sums on any machine
    rows = torch.unique(r)
    order = torch.argsort(dd[rows], dim=1, stable=True)  # recomputed distances may reorder the row
    idx[rows], dd[rows] = _in_row_order(idx[rows].gather(1, order), dd[rows].gather(1, order))
    return idx, dd


def _squares(x: np.ndarray) -> torch.Tensor:
    """||x||^2 of every row in float64, summed in one thread (the same bytes whatever the thread count)."""
    out = np.empty(len(x))
    for lo in range(0, len(x), 4096):
        part = x[lo:lo + 4096].astype(np.float64)
        out[lo:lo + 4096] = np.einsum("ij,ij->i", part, part)
    return torch.from_numpy(out)


def _augmented(x: np.ndarray, last: np.ndarray, width: int, sign: float) -> np.ndarray:
    """[sign x, last, 0 ...] as float32 rows of `width` columns."""
    out = np.zeros((len(x), width), np.float32)
    np.multiply(x, sign, out=out[:, :x.shape[1]])
    out[:, x.shape[1]] = last
    return out


def _product(b: np.ndarray, a_aug: np.ndarray, width: int, tile: int, out: np.ndarray,
             workers: ThreadPoolExecutor) -> np.ndarray:
    """out[:len(b)] = [-b, 1] . a_aug^T, by tiles of `tile` query rows, each a one-thread BLAS product run by one of
    `workers`: a one-thread product gives the same bytes however the rows are tiled, where a multi-threaded one
    changes its last bits with the thread count (and so would the neighbours of near-ties with --jobs)."""
    def one(lo: int) -> None:
        hi = min(len(b), lo + tile)
        np.matmul(_augmented(b[lo:hi], 1.0, width, -1.0), a_aug.T, out=out[lo:hi])

    list(workers.map(one, range(0, len(b), tile)))
    return out[:len(b)]


def filtered_rows(a: np.ndarray, b: np.ndarray, subsets: list[np.ndarray], depth: int, out: list,
                  block_bytes: float = 2e8) -> np.ndarray:
    """Fill out[s] = (idx, d2) for every query row of b; returns the rows left to the exact path (none: the
    pool's shortfalls are searched here). a [n, d], b [m, d] float32; subsets: sorted indices into a. Blocks of
    `block_bytes` per thread (torch's intra-op thread count)."""
    A, B = torch.from_numpy(np.ascontiguousarray(a, np.float32)), torch.from_numpy(np.ascontiguousarray(b, np.float32))
    na, nb = _squares(A.numpy()), _squares(B.numpy())
    na_max, (n, d) = float(na.max()), a.shape
    width = -(-(d + 1) // ALIGN) * ALIGN
    a_aug = _augmented(A.numpy(), (na / 2).float().numpy(), width, 1.0)  # [a, ||a||^2/2]
    subs = [torch.from_numpy(np.asarray(s, np.int64)) for s in subsets]
    pooled = [s for s, sub in enumerate(subs) if len(sub) >= POOLED * n]
    pool = min(n, max([depth] + [math.ceil(MARGIN * depth * n / len(subs[s])) for s in pooled]))
    member = {}
    for s in pooled:
        member[s] = torch.zeros(n, dtype=torch.bool)
        member[s][subs[s]] = True
    everything = torch.arange(n)
    threads = max(1, torch.get_num_threads())
    tile = max(1, int(block_bytes // (4 * max(1, n))))
    step = tile * threads
    block = np.empty((min(step, len(b)), n), np.float32)
    rank = pool - torch.arange(pool, dtype=torch.float32)  # earlier in the pool ranks higher
    with ThreadPoolExecutor(threads) as workers, threadpool_limits(1, user_api="blas"):
        for lo in range(0, len(b), step):
            hi = min(len(b), lo + step)
            t = torch.from_numpy(_product(b[lo:hi], a_aug, width, tile, block, workers))
            if pooled:
                pidx, pt = _nearest(t, everything, pool)
            for s, sub in enumerate(subs):
                if s in member:
                    m = member[s][pidx]  # [q, pool], nearest first
                    short = m.sum(1) < min(depth, len(sub))
                    first = torch.topk(m.float() * rank, min(depth, len(sub), pool), dim=1).indices.sort(dim=1).values
                    idx, tt = pidx.gather(1, first), pt.gather(1, first)  # the earliest members
                    if bool(short.any()):  # too few members among the pool's rows: search the subset itself
                        rows = torch.nonzero(short)[:, 0]
                        idx[rows], tt[rows] = _nearest(t[rows].index_select(1, sub), sub, depth)
                else:
                    idx, tt = _nearest(t if len(sub) == n else t.index_select(1, sub), sub, depth)
                dd = (tt.double() * 2 + nb[lo:hi, None]).clamp_min_(0)  # ||b||^2 + ||a||^2 - 2 b.a
                idx, dd = _near_exact(idx, dd, B[lo:hi], A, nb[lo:hi], na_max)
                k = idx.shape[1]
                out[s][0][lo:hi, :k] = idx.numpy()
                out[s][1][lo:hi, :k] = dd.numpy()
    return np.zeros(0, np.int64)
