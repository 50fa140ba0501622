"""The probes of `main_evaluate.py` on frozen features, with scikit-learn underneath: folds that keep groups
apart, nested label draws, a logistic-regression probe and k-NN.

Everything random derives from (seed, fold, draw) and the rows' sorted order, so the results do not depend on
the order of the input rows.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.preprocessing import StandardScaler

from util.errors import UserError
from util.evaluate.stats import Run

PROTOCOLS = ("logreg", "knn")
CS = np.logspace(-4, 1, 6)  # inverse regularisation strengths the inner cross-validation chooses from
ALPHAS = np.logspace(-2, 5, 8)  # ridge strengths (regression probe)
MIN_PER_CLASS = 2  # labelled rows of each class in every draw, however small the fraction


def make_folds(n: int, folds: int, seed: int, strata: np.ndarray | None = None, groups: np.ndarray | None = None,
               split: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) row indices. `split` [n] text: 'train'/'test' gives one fold, other values give one fold per
    value (its rows are the test rows). Otherwise k folds, stratified by `strata` (class indices) when given, and
    with `groups` no group in two folds."""
    if split is not None:
        values = np.char.lower(split.astype(str))
        if set(values) <= {"train", "test"}:
            if len(set(values)) < 2:
                raise UserError(f"--split_column holds only {values[0]!r}; it needs both train and test rows.")
            return [(np.flatnonzero(values == "train"), np.flatnonzero(values == "test"))]
        return [(np.flatnonzero(values != v), np.flatnonzero(values == v)) for v in np.unique(values)]
    units = n if groups is None else len(np.unique(groups))
    if folds > units:
        raise UserError(f"--folds {folds} needs at least {folds} {'groups' if groups is not None else 'rows'}; "
                        f"there are {units}.")
    if strata is not None:
        counts = np.bincount(strata)
        if groups is not None:
            counts = np.array([len(np.unique(groups[strata == c])) for c in range(len(counts))])
        if counts.min() < folds:
            raise UserError(f"class {int(np.argmin(counts))} has {counts.min()} "
                            f"{'groups' if groups is not None else 'rows'}, fewer than --folds {folds}: every test "
                            f"fold needs one; lower --folds or merge the class.")
    x = np.zeros(n)
    if groups is not None:
        try:
            kf = StratifiedGroupKFold(folds, shuffle=True, random_state=seed) if strata is not None else \
                GroupKFold(folds, shuffle=True, random_state=seed)
        except TypeError:  # scikit-learn < 1.6: GroupKFold balances group sizes, without shuffling
            kf = GroupKFold(folds)
        return [(tr, te) for tr, te in kf.split(x, strata, groups)]
    kf = StratifiedKFold(folds, shuffle=True, random_state=seed) if strata is not None else \
        KFold(folds, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in kf.split(x, strata)]


def labelled_rows(train: np.ndarray, strata: np.ndarray | None, fraction: float, seed: int, fold: int,
                  draw: int) -> np.ndarray:
    """The training rows whose labels a probe may use: `fraction` of each class (at least MIN_PER_CLASS), drawn
    with (seed, fold, draw). Nested: for one draw, a smaller fraction's rows are part of every larger one's."""
    if fraction >= 1:
        return train
    key = np.random.default_rng([seed, fold, draw, 11]).random(len(train))
    cls = np.zeros(len(train), np.int64) if strata is None else strata[train]
    keep = []
    for c in np.unique(cls):
        members = np.flatnonzero(cls == c)
        take = min(len(members), max(MIN_PER_CLASS, int(np.ceil(fraction * len(members)))))
        keep.append(members[np.argsort(key[members], kind="stable")[:take]])
    return train[np.sort(np.concatenate(keep))]


def _choose_c(a: np.ndarray, y: np.ndarray, seed: int, max_rows: int) -> float:
    """C of the logistic regression by inner stratified cross-validation (log loss) on at most `max_rows` rows;
    1.0 when a class has a single row."""
    counts = np.bincount(y)
    inner = min(3, int(counts[counts > 0].min()))
    if inner < 2:
        return 1.0
    idx = np.arange(len(y))
    if len(y) > max_rows:  # choosing C on a stratified subsample keeps large probes at minutes
        rng = np.random.default_rng([seed, 5])
        idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[
            :max(inner, int(round(max_rows * (y == c).mean())))] for c in np.unique(y)]))
    cv = StratifiedKFold(inner, shuffle=True, random_state=seed)
    lr = LogisticRegressionCV(Cs=CS, cv=cv, scoring="neg_log_loss", max_iter=200, refit=False)
    lr.fit(a[idx], y[idx])
    return float(np.exp(np.mean(np.log(lr.C_))))


def _logreg(a: np.ndarray, y: np.ndarray, b: np.ndarray, k: int, seed: int, max_rows: int) -> np.ndarray:
    """Class probabilities [m, k] of the test rows `b` (classes absent from training get 0; a single class seen,
    as for a rare label at a small fraction, gets 1)."""
    out = np.zeros((len(b), k))
    if len(np.unique(y)) < 2:
        out[:, y[0]] = 1.0
        return out
    clf = LogisticRegression(C=_choose_c(a, y, seed, max_rows), max_iter=1000).fit(a, y)
    out[:, clf.classes_] = clf.predict_proba(b)
    return out


def _knn(a: np.ndarray, y: np.ndarray, b: np.ndarray, k: int, knn_k: int) -> np.ndarray:
    clf = KNeighborsClassifier(min(knn_k, len(a)), weights="distance", algorithm="brute").fit(a, y)
    out = np.zeros((len(b), k))
    out[:, clf.classes_] = clf.predict_proba(b)
    return out


def _balanced_decision(p: np.ndarray, y_train: np.ndarray, k: int) -> np.ndarray:
    """The class with the largest probability over its share of the training labels (what maximises balanced
    accuracy when the probabilities are calibrated)."""
    prior = np.bincount(y_train, minlength=k) / len(y_train)
    return np.argmax(p / np.maximum(prior, 1e-12), axis=1)


def fit_predict(protocol: str, task: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                n_out: int, seed: int = 0, knn_k: int = 20, max_rows: int = 10000) -> Run:
    """Fit one probe on the labelled rows and predict the test rows.

    Features are standardised with the training rows' statistics. logreg: logistic regression, C chosen by
    inner 3-fold cross-validation (per label for multi-label); regression: ridge, alpha by efficient
    leave-one-out. knn: the `knn_k` nearest training rows by Euclidean distance of the standardised features
    (cosine would reduce a one-column baseline such as a diameter to its sign), votes weighted by inverse
    distance."""
    scaler = StandardScaler().fit(x_train)
    a, b = scaler.transform(x_train), scaler.transform(x_test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # LogisticRegressionCV's parameters change in sklearn 1.10
        if task.continuous:
            model = RidgeCV(alphas=ALPHAS) if protocol == "logreg" else \
                KNeighborsRegressor(min(knn_k, len(a)), weights="distance", algorithm="brute")
            return Run(np.asarray(model.fit(a, y_train).predict(b)).reshape(len(b), -1))
        if task.multi_label:
            probs = np.stack([(_logreg(a, y_train[:, j], b, 2, seed, max_rows) if protocol == "logreg" else
                               _knn(a, y_train[:, j], b, 2, knn_k))[:, 1] for j in range(n_out)], axis=1)
            prior = y_train.mean(0)
            return Run(probs, (probs / np.maximum(prior, 1e-12) > (1 - probs) / np.maximum(1 - prior, 1e-12))
                       .astype(np.int64))
        probs = _logreg(a, y_train, b, n_out, seed, max_rows) if protocol == "logreg" else \
            _knn(a, y_train, b, n_out, knn_k)
    return Run(probs, _balanced_decision(probs, y_train, n_out))


def probe_job(features, labelled: np.ndarray, test: np.ndarray, y_labelled: np.ndarray, protocol: str, task: str,
              n_out: int, seed: int, knn_k: int, max_rows: int) -> Run:
    """fit_predict on rows of `features`: an array, or the path of a .npy read memory-mapped (what a worker
    process of main_evaluate.py --jobs gets, so that nothing large is pickled)."""
    x = np.load(features, mmap_mode="r") if isinstance(features, str) else features
    return fit_predict(protocol, task, np.asarray(x[labelled]), y_labelled, np.asarray(x[test]), n_out, seed,
                       knn_k, max_rows)
