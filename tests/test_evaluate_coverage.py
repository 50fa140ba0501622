"""main_evaluate.py's 95% intervals mean what they say, shown by simulation through its own code path
(util/evaluate/crossval.fold_job: 5 stratified folds, the logistic-regression probe with its inner search for C,
the refitted bootstrap): on pure-noise embeddings they contain 0.5, on Gaussian classes they contain the AUROC the
probe reaches on new rows (known exactly for a linear scorer), at least 92% of the time over 100 data sets per
setting; and the point estimate with 20% positives is not biased below 0.5. The larger version (more settings,
k-NN, more repetitions) is bench/bench_coverage.py."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from util.evaluate.crossval import fold_job
from util.evaluate.probe import Fitted, make_folds, standardiser
from util.evaluate.stats import refit_interval, resample_weights
from util.task.tasks import BinaryTask
from util.task.weighted import nanmean

REPS, RESAMPLES, DIM = 100, 200, 4
TASK = BinaryTask()


def simulate(rng, n: int, positives: float, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """n rows, round(positives * n) of class 1; class 1 is shifted by `shift` along the first of DIM features."""
    y = (np.arange(n) < round(positives * n)).astype(np.int64)
    x = rng.normal(size=(n, DIM))
    x[:, 0] += shift * y
    return x.astype(np.float32), y


def evaluate(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """What main_evaluate.py reports for one data set: the mean over 5 folds of each fold's AUROC, on the rows
    and on each refitted resample ([1 + RESAMPLES])."""
    counts = np.concatenate(list(resample_weights(len(y), RESAMPLES, seed)))
    per_fold = [fold_job(x, tr, te, y, None, {(1.0, 0): tr}, "logreg", TASK, 2, ["0", "1"], seed, 20, 10000,
                         counts)[(1.0, 0)][0]["auroc"] for tr, te in make_folds(len(y), 5, seed, y)]
    return nanmean(np.array(per_fold))


def population_auroc(n_train: int, positives: float, shift: float, rng, repeats: int = 300) -> float:
    """The interval's target: the AUROC on new rows of the probe trained on n_train rows, averaged over training
    sets. A linear scorer v.x separates N(0, I) from N(shift e_1, I) with AUROC Phi(v_1 shift / (sqrt(2) |v|))."""
    values = []
    for r in range(repeats):
        x, y = simulate(rng, n_train, positives, shift)
        mean, scale = standardiser(x)
        a = ((x - mean) / scale).astype(np.float32)
        w = Fitted("logreg", TASK, a, y, a[:1], 2, r, 20, 10000).models[0].w[0, :-1] / scale
        values.append(norm.cdf(w[0] * shift / (np.sqrt(2) * np.linalg.norm(w))))
    return float(np.mean(values))


def coverage(n: int, positives: float, shift: float, target: float | None, seed: int) -> tuple[float, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = 0.5 if target is None else target
    hits, points = [], []
    for r in range(REPS):
        values = evaluate(*simulate(rng, n, positives, shift), seed=1000 * seed + r)
        point, low, high = refit_interval(values, bounds=(0, 1))
        hits.append(low <= target <= high)
        points.append(point)
    return float(np.mean(hits)), np.array(points)


@pytest.mark.parametrize("n,positives", [(50, 0.5), (50, 0.2), (200, 0.5), (200, 0.2)])
def test_noise_intervals_contain_chance_and_the_point_is_not_biased(n, positives):
    covered, points = coverage(n, positives, 0.0, None, seed=n + int(100 * positives))
    assert covered >= 0.92, f"pure noise, n={n}, {positives:.0%} positives: 0.5 inside {covered:.0%} of intervals"
    se = points.std() / np.sqrt(len(points))
    # pooling the out-of-fold scores of five models put the point at 0.47-0.49 with 20% positives
    assert abs(points.mean() - 0.5) < 2.5 * se, (points.mean(), se)


@pytest.mark.parametrize("n,positives", [(50, 0.2), (200, 0.5)])
def test_signal_intervals_contain_the_population_auroc(n, positives):
    shift = 1.0
    target = population_auroc(n * 4 // 5, positives, shift, np.random.default_rng(7))
    assert 0.65 < target < 0.76  # a real but imperfect signal (Phi(1 / sqrt 2) = 0.76 for the best direction)
    covered, points = coverage(n, positives, shift, target, seed=3 * n)
    assert covered >= 0.92, f"signal, n={n}: the population AUROC {target:.3f} inside {covered:.0%} of intervals"
    assert abs(points.mean() - target) < 3 * points.std() / np.sqrt(len(points))  # the point estimates it
