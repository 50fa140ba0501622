"""The probes of main_evaluate.py piece by piece: the inner search for C (group-aware, the best mean score), the
logistic regression solved here against scikit-learn's, the one-step refit against an exact refit, the k-NN
engine against scikit-learn's brute force (also under bootstrap copies), and the per-resample metrics against
the weighted ones."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

from util.evaluate import knn, linear
from util.evaluate.metrics import resample_metrics
from util.evaluate.probe import CS, choose_c, inner_scores, standardised, standardiser
from util.evaluate.stats import Run, weighted_metrics
from util.task.tasks import BinaryTask, MultiClassTask, MultiLabelTask, RegressionTask


def near_duplicates(seed: int = 0, patients: int = 30, scans: int = 6, dim: int = 5):
    """Pure noise, one label per patient, each patient scanned `scans` times (near-identical embeddings)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(patients, dim))
    label = np.arange(patients) % 2
    groups = np.repeat(np.arange(patients), scans)
    x = base[groups] + 0.01 * rng.normal(size=(patients * scans, dim))
    return x, label[groups], groups


def test_the_inner_search_keeps_a_patient_out_of_its_own_validation_fold():
    x, y, groups = near_duplicates()
    # without groups the validation rows have near-copies in training: memorising pays, a weak penalty wins
    assert choose_c(x, y, None, seed=0) >= 1.0
    # with groups the validation patients are new: the labels are noise, the strongest penalty wins
    assert choose_c(x, y, groups, seed=0) == CS[0]


def test_the_inner_search_takes_the_c_with_the_best_mean_score():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 4))
    y = (x[:, 0] + 1.5 * rng.normal(size=90) > 0).astype(int)
    scores = inner_scores(x, y, None, seed=3)
    assert scores.shape == (len(CS), 3) and np.isfinite(scores).all()
    chosen = choose_c(x, y, None, seed=3)
    assert chosen == CS[np.argmin(scores.mean(1))]  # a grid value, not an average of each fold's best C
    assert chosen in CS


def test_newton_solves_scikit_learns_objective_and_the_one_step_refit_is_close_to_refitting():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6))
    y = (x[:, 0] - 0.5 * x[:, 1] + rng.normal(size=300) > 0.3).astype(int)
    w = linear.newton_binary(x, y, [1e-3, 0.1, 10.0])
    for c, wc in zip([1e-3, 0.1, 10.0], w):
        ref = LogisticRegression(C=c, tol=1e-12, max_iter=10000).fit(x, y)
        assert np.abs(wc[:-1] - ref.coef_[0]).max() < 1e-6 and abs(wc[-1] - ref.intercept_[0]) < 1e-6
    counts = rng.multinomial(300, np.ones(300) / 300, size=50).astype(float)
    coef, icpt = linear.fit_logistic(x, y, 1.0)
    step = linear.LogisticRefit(x, y, coef, icpt, 1.0).weights(counts)[:, 0]
    exact = linear.newton_binary(x, y, [1.0] * 50, counts)
    moved = exact - np.r_[coef[0], icpt]
    assert (np.abs(step - exact).max(1) < 0.5 * np.abs(moved).max(1)).all()  # the error is of second order
    assert np.allclose(np.std(step, 0), np.std(exact, 0), rtol=0.15)  # the spread the bootstrap uses
    assert np.allclose(linear.LogisticRefit(x, y, coef, icpt, 1.0).weights(np.ones((1, 300)))[0, 0],
                       np.r_[coef[0], icpt])  # no resampling, no move
    y3 = rng.integers(0, 3, 300)
    coef3, icpt3 = linear.fit_logistic(x, y3, 0.5)
    p = linear.LogisticRefit(x, y3, coef3, icpt3, 0.5).proba(x[:5], np.ones((1, 300)))[0]
    assert np.allclose(p, linear.logistic_proba(x[:5], coef3, icpt3))  # multinomial: no resampling, no move
    assert np.allclose(p, LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(x, y3).predict_proba(x[:5]),
                       atol=1e-3)  # scikit-learn's default tolerance


@pytest.mark.parametrize("large", [False, True])
def test_knn_equals_scikit_learns_brute_force(large):
    """Same neighbours and probabilities (up to float32 rounding: scikit-learn returns float32 distances for
    float32 input) for every nested subset; large=True forces the float32 blocks with the shared pool. Where the
    k-th and the next distance agree to 1e-6 (float32 cannot order them), either neighbour may come first."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3000, 48)).astype(np.float32)
    b = rng.normal(size=(400, 48)).astype(np.float32)
    b[:3] = a[[5, 17, 2999]]  # queries sitting on a training row: distance 0
    y = rng.integers(0, 3, 3000)
    full = np.arange(3000)
    subsets = [full, np.sort(rng.choice(3000, 750, replace=False)), np.sort(rng.choice(3000, 30, replace=False)),
               np.sort(rng.choice(3000, 6, replace=False))]
    found = knn.neighbours(a, b, subsets, depth=40, large=0 if large else float("inf"))
    exact = knn.neighbours(a, b, subsets, depth=40, large=float("inf"))
    for sub, (idx, d2), (_, d2_exact) in zip(subsets, found, exact):
        k = min(20, len(sub))
        gap = np.abs(np.diff(np.sqrt(d2_exact[:, k - 1:k + 1]), axis=1))[:, 0] if len(sub) > k else np.inf
        clear = ~(gap < 1e-6 * np.sqrt(d2_exact[:, k - 1]))
        clf = KNeighborsClassifier(k, weights="distance", algorithm="brute").fit(a[sub], y[sub])
        dist, ind = clf.kneighbors(b)
        assert np.array_equal(sub[ind][clear], idx[clear, :k]) and clear.mean() > 0.99
        assert np.allclose(np.sqrt(d2[:, :k]), dist, rtol=1e-5, atol=1e-5)
        ref = np.zeros((len(b), 3))
        ref[:, clf.classes_] = clf.predict_proba(b)
        assert np.abs(knn.votes(idx, d2, np.eye(3)[y], k) - ref)[clear].max() < 1e-6
        values = rng.normal(size=(3000, 1))
        reg = KNeighborsRegressor(k, weights="distance", algorithm="brute").fit(a[sub], values[sub])
        assert np.abs(knn.votes(idx, d2, values, k) - reg.predict(b))[clear].max() < 1e-5
        assert (idx[:, len(sub):] == -1).all()  # a subset smaller than the depth is padded


def test_the_float32_blocks_order_ties_like_the_exact_path_where_the_pruned_top_k_runs():
    """Small-integer features: most distances tie, exactly representable in float32. At 40,000 training rows the
    blocks select through column groups (util/evaluate/knn_filter.py's _smallest) for the pool and for a direct
    subset of 3,000 rows; every subset's neighbours (ties in training-row order, across the cut too) and distances
    equal the float64 path's, and queries sitting on training rows get distance 0."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 5, (40_000, 3)).astype(np.float32)
    b = rng.integers(0, 5, (300, 3)).astype(np.float32)
    subsets = [np.arange(40_000), np.sort(rng.choice(40_000, 10_000, replace=False)),
               np.sort(rng.choice(40_000, 3_000, replace=False)), np.sort(rng.choice(40_000, 400, replace=False))]
    found = knn.neighbours(a, b, subsets, depth=40, large=0)
    exact = knn.neighbours(a, b, subsets, depth=40, large=float("inf"))
    for (idx, d2), (idx_e, d2_e) in zip(found, exact):
        assert np.array_equal(idx, idx_e) and np.array_equal(d2, d2_e)
        assert (np.diff(d2, axis=1) >= 0).all()
    assert (found[0][1][:, :40] == 0).all()  # 125 distinct points in 40,000 rows: every query sits on 40 or more


def test_the_float32_blocks_give_the_same_bytes_with_one_thread_or_two():
    """The distance product runs as one-thread BLAS tiles, so the neighbours and their float distances do not
    depend on the thread count (--jobs, the machine's cores); a two-thread BLAS product changes the last bits of
    most entries, and so the distances and the order of near-ties."""
    import torch

    rng = np.random.default_rng(5)
    a = rng.normal(size=(20_000, 96)).astype(np.float32)
    b = rng.normal(size=(3_000, 96)).astype(np.float32)  # two tiles of 2,500 and 500 rows
    subsets = [np.arange(20_000), np.sort(rng.choice(20_000, 2_500, replace=False))]
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(knn.neighbours(a, b, subsets, depth=30, large=0))
    finally:
        torch.set_num_threads(before)
    for (idx1, d1), (idx2, d2) in zip(*runs):
        assert np.array_equal(idx1, idx2) and np.array_equal(d1, d2)


def test_the_grouped_top_k_is_the_top_k():
    """_smallest keeps the k smallest values of every row (and their columns) whatever the ties and whether the
    column count is a multiple of the group size."""
    import torch

    from util.evaluate.knn_filter import _smallest

    rng = np.random.default_rng(4)
    for c, k in [(80_000, 43), (80_003, 338), (40_013, 631), (5_000, 60)]:
        t = torch.from_numpy(rng.integers(0, 60, (40, c)).astype(np.float32))
        vals, cols = _smallest(t, k)
        assert torch.equal(vals, torch.topk(t, k, dim=1, largest=False, sorted=True).values), (c, k)
        assert torch.equal(t.gather(1, cols), vals) and (cols.sort(1).values.diff(1) > 0).all()


def test_knn_ties_are_ordered_by_training_row_and_resamples_vote_like_duplicated_rows():
    a = np.array([[0.0], [1.0], [1.0], [-1.0], [2.0], [3.0]], np.float32)  # rows 1, 2, 3 tie for query 0
    b = np.array([[0.0], [2.9]], np.float32)
    (idx, d2), = knn.neighbours(a, b, [np.arange(6)], depth=6)
    assert idx[0].tolist() == [0, 1, 2, 3, 4, 5] and idx[1].tolist() == [5, 4, 1, 2, 0, 3]
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    q = rng.normal(size=(50, 5)).astype(np.float32)
    y = rng.integers(0, 2, 200)
    (idx, d2), = knn.neighbours(x, q, [np.arange(200)], depth=60)
    counts = rng.multinomial(200, np.ones(200) / 200, size=3)
    got = knn.resampled_votes(idx, d2, np.eye(2)[y], 20, counts)
    for c, g in zip(counts, got):
        rows = np.repeat(np.arange(200), c)  # the resample as a table with duplicated rows
        clf = KNeighborsClassifier(20, weights="distance", algorithm="brute").fit(x[rows], y[rows])
        assert np.abs(clf.predict_proba(q) - g).max() < 1e-6


@pytest.mark.parametrize("task", [BinaryTask(), MultiClassTask(), MultiLabelTask(), RegressionTask()])
def test_per_resample_metrics_equal_the_weighted_metrics(task):
    rng = np.random.default_rng(0)
    n, names = 120, ["a", "b", "c"]
    w = rng.integers(0, 3, (4, n)).astype(float)
    if task.continuous:
        y, scores, pred = rng.normal(size=(n, 2)), rng.normal(size=(4, n, 2)), None
    elif task.multi_label:
        y = rng.integers(0, 2, (n, 3))
        scores = np.round(rng.random((4, n, 3)), 1)  # ties
        pred = (scores > 0.5).astype(int)
    else:
        k = 2 if task == BinaryTask() else 3
        y = rng.integers(0, k, n)
        scores = rng.dirichlet(np.ones(k), size=(4, n))
        scores[:, :40] = np.round(scores[:, :40], 1)  # ties
        pred = scores.argmax(2)
    got = resample_metrics(task, y, scores, pred, w, names)
    for b in range(4):
        want = weighted_metrics(task, y, Run(scores[b] if task.continuous or task.multi_label or k > 2
                                             else scores[b][:, 1], None if pred is None else pred[b]),
                                w[b:b + 1], names)
        assert set(want) == set(got)
        for m in want:
            assert abs(got[m][b] - want[m][0]) < 1e-12, (m, got[m][b], want[m][0])
    if task == BinaryTask():
        assert abs(got["auroc"][0] - skm.roc_auc_score(y, scores[0][:, 1], sample_weight=w[0])) < 1e-12


def test_the_standardiser_is_the_whole_array_computation_to_the_bit():
    """standardiser() works 32 columns at a time and standardised() 2,048 rows at a time; both give the bytes of
    the whole-array float64 computation (so no result moved when they were chunked); a constant column keeps
    scale 1."""
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(5000, 70)).astype(np.float32)
    x[:, 33] = 1.5
    mean, scale = standardiser(x)
    whole = x.astype(np.float64)
    assert np.array_equal(mean, whole.mean(0))
    assert np.array_equal(scale, np.where(whole.std(0) > 0, whole.std(0), 1.0)) and scale[33] == 1.0
    assert np.array_equal(standardised(x, mean, scale), ((x - mean) / scale).astype(np.float32))  # row blocks
