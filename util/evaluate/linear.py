"""The linear probes of `main_evaluate.py`: L2-penalised logistic regression and ridge, fitted, and refitted under
bootstrap weights by one Newton step.

Logistic regression minimises 1/2 ||w||^2 + C * sum_i s_i * logloss_i (intercept unpenalised), scikit-learn's
objective. Small problems (few features) are solved here by damped Newton steps, many problems at once (every C
and inner fold of a search share one call, a row left out has weight 0); large ones by scikit-learn's L-BFGS. Both
reach the same optimum (tests/test_evaluate_probe.py compares them).

A refit under row weights c (a bootstrap resample counts each row c times) starts at the fitted weights w, where
the unweighted gradient is zero, and takes one Newton step: w_c = w - H^-1 g_c with g_c the gradient of the
c-weighted objective and H the Hessian at w. This is the linearised refit (the one-step bootstrap); it costs one
matrix product per batch of resamples instead of a fit per resample.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.special import expit, log_expit, softmax

NEWTON_MAX_COST = 4e7  # rows x (features + 1)^2 x problems per Newton iteration solved here; above: scikit-learn


def _design(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64), np.ones((len(x), 1))], axis=1)


def _penalty(d: int) -> np.ndarray:
    pen = np.ones(d + 1)
    pen[-1] = 0.0  # the intercept is not penalised
    return pen


def _objective(X, y, W, cs, S, pen):
    z = W @ X.T  # [P, n]
    loss = -(S * np.where(y[None] == 1, log_expit(z), log_expit(-z))).sum(1)
    return 0.5 * (pen * W * W).sum(1) + cs * loss


def newton_binary(x: np.ndarray, y: np.ndarray, cs, weights: np.ndarray | None = None, tol: float = 1e-10,
                  max_iter: int = 100) -> np.ndarray:
    """Binary logistic regression for P problems at once: x [n, d], y [n] 0/1, cs [P], weights [P, n] (None: all
    ones) -> [P, d + 1] (coefficients, then the intercept), each the minimiser of its own objective."""
    X, y = _design(x), np.asarray(y, np.float64)
    cs = np.atleast_1d(np.asarray(cs, np.float64))
    S = np.ones((len(cs), len(y))) if weights is None else np.asarray(weights, np.float64)
    pen = _penalty(x.shape[1])
    W = np.zeros((len(cs), X.shape[1]))
    f = _objective(X, y, W, cs, S, pen)
    active = np.ones(len(cs), bool)
    for _ in range(max_iter):
        p = expit(W @ X.T)
        g = cs[:, None] * ((S * (p - y[None])) @ X) + pen * W
        h = np.einsum("pn,ni,nj->pij", cs[:, None] * S * p * (1 - p), X, X) + np.diag(pen + 1e-12)
        step = np.linalg.solve(h, g[:, :, None])[:, :, 0]
        step[~active] = 0
        t = np.ones(len(cs))
        for _ in range(40):  # backtracking: halve the step of a problem whose objective would rise
            trial = _objective(X, y, W - t[:, None] * step, cs, S, pen)
            worse = trial > f + 1e-12 * np.abs(f)
            if not worse.any():
                break
            t[worse] *= 0.5
        W -= t[:, None] * step
        f = _objective(X, y, W, cs, S, pen)
        active &= np.abs(t[:, None] * step).max(1) > tol
        if not active.any():
            break
    return W


def _sklearn(C: float, warm: bool = False):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=1000, warm_start=warm)  # scikit-learn's tolerance (1e-4)


def fit_logistic(a: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
    """(coef [K', d], intercept [K']) of the logistic regression of class indices y (K' = 1 for two classes, the
    logit of class 1; else one row per class, multinomial)."""
    k = int(y.max()) + 1
    if k == 2 and len(y) * (a.shape[1] + 1) ** 2 <= NEWTON_MAX_COST:
        w = newton_binary(a, y, [C])[0]
        return w[None, :-1], w[-1:]
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = _sklearn(C).fit(a, y)
    return clf.coef_.astype(np.float64), clf.intercept_.astype(np.float64)


def warm_path(a: np.ndarray, y: np.ndarray, cs):
    """(coef, intercept) for each C of `cs` in turn (ascending), each fit started from the previous one, as
    scikit-learn's LogisticRegressionCV walks its path; for the inner search of large problems."""
    from sklearn.exceptions import ConvergenceWarning

    clf = _sklearn(cs[0], warm=True)
    for c in cs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.set_params(C=c).fit(a, y)
        yield clf.coef_.astype(np.float64), clf.intercept_.astype(np.float64)


def logistic_proba(b: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Class probabilities [m, K] (K = 2 for a single logit)."""
    z = np.asarray(b, np.float64) @ coef.T + intercept
    if coef.shape[0] == 1:
        p = expit(z[:, 0])
        return np.stack([1 - p, p], axis=1)
    return softmax(z, axis=1)


def _factor(h: np.ndarray, free: np.ndarray):
    """Cholesky factor of the Hessian h. The multinomial logits are defined up to a shared shift, which leaves
    the unpenalised intercepts (`free` = 1) one flat direction: a small ridge there removes it (the gradients of
    the refits have no component along it)."""
    scale = max(1.0, float(np.abs(np.diag(h)).max()))
    for jitter in (0.0, 1e-9, 1e-6, 1e-3):
        try:
            return cho_factor(h + np.diag(free * jitter * scale) if jitter else h)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the logistic-regression Hessian is not positive definite")


class LogisticRefit:
    """One-step refits of a fitted logistic regression (binary or multinomial) under batches of row weights."""

    def __init__(self, a: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, C: float):
        self.X = _design(a).astype(np.float32 if a.size * a.shape[1] > 1e8 else np.float64)
        self.w = np.concatenate([coef, intercept[:, None]], axis=1)  # [K', d + 1]
        self.C, k, d1 = C, coef.shape[0], self.X.shape[1]
        p = logistic_proba(a, coef, intercept)
        if k == 1:
            self.resid = (p[:, 1] - y)[:, None]  # [n, 1]
            s = (p[:, 1] * (1 - p[:, 1])).astype(self.X.dtype)
            h = C * ((self.X * s[:, None]).T @ self.X).astype(np.float64)
        else:
            self.resid = p - np.eye(k)[y]  # [n, K]
            h = np.zeros((k * d1, k * d1))
            for i in range(k):
                for j in range(i, k):
                    s = (p[:, i] * ((i == j) - p[:, j])).astype(self.X.dtype)
                    block = C * ((self.X * s[:, None]).T @ self.X).astype(np.float64)
                    h[i * d1:(i + 1) * d1, j * d1:(j + 1) * d1] = block
                    h[j * d1:(j + 1) * d1, i * d1:(i + 1) * d1] = block.T
        h[np.diag_indices_from(h)] += np.tile(_penalty(d1 - 1), k)
        self.chol = _factor(h, np.tile(1 - _penalty(d1 - 1), k))

    def weights(self, counts: np.ndarray) -> np.ndarray:
        """Refitted weights [b, K', d + 1] for row weights counts [b, n]."""
        k, d1 = self.w.shape
        extra = np.asarray(counts, self.X.dtype) - 1  # the fitted weights zero the unweighted gradient
        g = np.stack([self.C * (extra * self.resid[:, j].astype(self.X.dtype)) @ self.X for j in range(k)], axis=1)
        step = cho_solve(self.chol, g.reshape(len(g), k * d1).astype(np.float64).T).T
        return self.w[None] - step.reshape(len(g), k, d1)

    def proba(self, b: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Probabilities [b, m, K] of the test rows b [m, d] under each refit."""
        w = self.weights(counts)  # [r, K', d + 1]
        if getattr(self, "_test", (None,))[0] is not b:
            self._test = (b, _design(b).astype(self.X.dtype))  # the test rows' design, built once
        z = (self._test[1] @ w.reshape(-1, w.shape[2]).T.astype(self.X.dtype)).reshape(len(b), len(w), -1)
        z = z.transpose(1, 0, 2).astype(np.float64)
        if w.shape[1] == 1:
            p = expit(z[..., 0])
            return np.stack([1 - p, p], axis=-1)
        return softmax(z, axis=-1)


class RidgeRefit:
    """One-step refits of a ridge regression (objective ||y - Xw - b||^2 + alpha ||w||^2, scikit-learn's Ridge);
    for this quadratic objective the step from the fitted weights is exact up to the weights' effect on H."""

    def __init__(self, a: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, alpha: float):
        self.X = _design(a)
        self.w = np.concatenate([np.atleast_2d(coef), np.atleast_1d(intercept)[:, None]], axis=1)  # [K, d + 1]
        self.resid = y.reshape(len(y), -1) - self.X @ self.w.T  # [n, K]
        h = self.X.T @ self.X
        h[np.diag_indices_from(h)] += alpha * _penalty(a.shape[1])
        self.chol = _factor(h, 1 - _penalty(a.shape[1]))

    def predict(self, b: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Predicted values [b, m, K] of the test rows under each refit (counts [b, n])."""
        extra = np.asarray(counts, np.float64) - 1
        g = np.einsum("bn,nk,nd->bkd", extra, self.resid, self.X)  # minus the weighted gradient / 2
        step = cho_solve(self.chol, g.reshape(-1, self.X.shape[1]).T).T.reshape(g.shape)
        return np.einsum("md,bkd->bmk", _design(b), self.w[None] + step)
