"""The probes of `main_evaluate.py` on frozen features: folds that keep groups apart, nested label draws, the
inner search for C, and fitted probes that predict their test rows and refit under bootstrap resamples.

Everything random derives from (seed, fold, draw) and the rows' sorted order, so the results do not depend on
the order of the input rows.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import GroupKFold, KFold, StratifiedKFold

from util.errors import UserError
from util.evaluate import knn, linear
from util.evaluate.group_folds import stratified_group_folds

CS = np.logspace(-4, 1, 6)  # inverse regularisation strengths the inner cross-validation chooses from
ALPHAS = np.logspace(-2, 5, 8)  # ridge strengths (regression probe)
MIN_PER_CLASS = 2  # labelled rows of each class in every draw, however small the fraction


def _units(rows: np.ndarray, groups: np.ndarray | None) -> int:
    return len(rows) if groups is None else len(np.unique(groups[rows]))


def check_split(folds, strata, groups, column: str, names) -> None:
    """A given split must train on at least MIN_PER_CLASS rows (or groups) of every class and test on at least
    one, as the k-fold branch requires; one sentence naming the column, the part and the class."""
    if strata is None:
        return
    unit = "groups" if groups is not None else "rows"
    for train, test in folds:
        for c in range(int(strata.max()) + 1):
            n_tr = _units(train[strata[train] == c], groups)
            n_te = _units(test[strata[test] == c], groups)
            name = names[c] if names is not None else c
            part = "" if len(folds) == 1 else f" (test part {len(folds)} values)"
            if n_tr < MIN_PER_CLASS:
                raise UserError(f"--split_column {column}: the training part{part} has {n_tr} {unit} of class "
                                f"{name}; a probe needs at least {MIN_PER_CLASS} of every class to learn from.")
            if n_te == 0:
                raise UserError(f"--split_column {column}: the test part{part} has no {unit} of class {name}; "
                                f"its AUROC would be undefined.")


def make_folds(n: int, folds: int, seed: int, strata: np.ndarray | None = None, groups: np.ndarray | None = None,
               split: np.ndarray | None = None, split_name: str = "split",
               names=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) row indices. `split` [n] text: 'train'/'test' gives one fold, other values give one fold per
    value (its rows are the test rows). Otherwise k folds, stratified by `strata` (class indices) when given, and
    with `groups` no group in two folds. Either way every class has MIN_PER_CLASS rows (groups) to train on."""
    if split is not None:
        values = np.char.lower(split.astype(str))
        if set(values) <= {"train", "test"}:
            if len(set(values)) < 2:
                raise UserError(f"--split_column holds only {values[0]!r}; it needs both train and test rows.")
            out = [(np.flatnonzero(values == "train"), np.flatnonzero(values == "test"))]
        else:
            out = [(np.flatnonzero(values != v), np.flatnonzero(values == v)) for v in np.unique(values)]
        check_split(out, strata, groups, split_name, names)
        return out
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
        if strata is not None:  # scikit-learn's StratifiedGroupKFold(shuffle=True), to the fold, in seconds
            return stratified_group_folds(strata, groups, folds, seed)
        try:
            kf = GroupKFold(folds, shuffle=True, random_state=seed)
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


def standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of the rows x, as scikit-learn's StandardScaler (a constant column keeps scale 1). Computed
    32 columns at a time in float64: the same sums in the same order as on the whole array (the same bytes), in
    a quarter of the time at 80,000 x 1,024 (no 640 MB temporaries)."""
    mean, std = np.empty(x.shape[1]), np.empty(x.shape[1])
    for lo in range(0, x.shape[1], 32):
        part = np.asarray(x[:, lo:lo + 32], np.float64)
        mean[lo:lo + 32], std[lo:lo + 32] = part.mean(0), part.std(0)
    return mean, np.where(std > 0, std, 1.0)


def standardised(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 (x - mean) / scale, computed in float64 2,048 rows at a time: the same bytes as on the whole array,
    without its two 640 MB float64 temporaries at 80,000 x 1,024 (fresh memory is slow to touch on a VM)."""
    out = np.empty(x.shape, np.float32)
    for lo in range(0, len(x), 2048):
        out[lo:lo + 2048] = (np.asarray(x[lo:lo + 2048], np.float64) - mean) / scale
    return out


def _inner_subsample(y, groups, seed, max_rows):
    """At most about `max_rows` rows for the inner search: whole groups (or rows) drawn at random, per class."""
    idx = np.arange(len(y))
    if len(y) <= max_rows:
        return idx
    rng = np.random.default_rng([seed, 5])
    if groups is None:
        return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[
            :max(3, int(round(max_rows * (y == c).mean())))] for c in np.unique(y)]))
    uniq, inv = np.unique(groups, return_inverse=True)
    order = rng.permutation(len(uniq))
    sizes = np.bincount(inv)[order]
    keep = order[:int(np.searchsorted(np.cumsum(sizes), max_rows)) + 1]
    return np.flatnonzero(np.isin(inv, keep))


def inner_scores(a: np.ndarray, y: np.ndarray, groups: np.ndarray | None, seed: int,
                 max_rows: int = 10000, cs=CS) -> np.ndarray | None:
    """Mean held-out log-loss [len(cs), folds] of each C in each inner fold (3 folds, fewer when a class has fewer
    rows or groups; group-aware with `groups`), on at most `max_rows` rows; None when a class has a single one."""
    idx = _inner_subsample(y, groups, seed, max_rows)
    a, y, groups = a[idx], y[idx], None if groups is None else groups[idx]
    units = [_units(np.flatnonzero(y == c), groups) for c in np.unique(y)]
    inner = min(3, min(units))
    if inner < 2 or len(units) < 2:
        return None
    cv = StratifiedKFold(inner, shuffle=True, random_state=seed).split(a, y) if groups is None else \
        stratified_group_folds(y, groups, inner, seed)
    splits = [(tr, va) for tr, va in cv if len(np.unique(y[tr])) == len(units)]
    k = int(y.max()) + 1
    out = np.full((len(cs), len(splits)), np.nan)
    small = k == 2 and len(y) * (a.shape[1] + 1) ** 2 * len(cs) * len(splits) <= linear.NEWTON_MAX_COST
    if small:  # every C and inner fold in one batched Newton solve; a held-out row has weight 0
        weights = np.zeros((len(cs) * len(splits), len(y)))
        for f, (tr, _) in enumerate(splits):
            weights[f::len(splits), tr] = 1.0
        w = linear.newton_binary(a, y, np.repeat(cs, len(splits)), weights)
    for f, (tr, va) in enumerate(splits):
        path = None if small else linear.warm_path(a[tr], y[tr], cs)  # each C starts where the last ended
        for j, c in enumerate(cs):
            coef, icpt = (w[j * len(splits) + f][None, :-1], w[j * len(splits) + f][-1:]) if small else next(path)
            p = linear.logistic_proba(a[va], coef, icpt)
            out[j, f] = -np.mean(np.log(np.clip(p[np.arange(len(va)), y[va]], 1e-15, 1.0)))
    return out


def choose_c(a: np.ndarray, y: np.ndarray, groups: np.ndarray | None, seed: int, max_rows: int = 10000,
             cs=CS) -> float:
    """The C with the best (lowest) mean held-out log-loss over the inner folds, the more regularised on a tie;
    1.0 when a class has a single row (or group)."""
    scores = inner_scores(a, y, groups, seed, max_rows, cs)
    if scores is None:
        return 1.0
    mean = np.nanmean(scores, axis=1)
    return float(np.asarray(cs)[int(np.nanargmin(mean))])


class Fitted:
    """A probe fitted on its labelled rows: `scores` [m, K] of its test rows (probabilities, or predicted values),
    and `resampled(counts)` [b, m, K], the same after refitting with training row j counted counts[:, j] times."""

    def __init__(self, protocol: str, task, a, y, b, n_out: int, seed: int, knn_k: int, max_rows: int,
                 groups=None, neighbours=None):
        self.task, self.y, self.b = task, y, b
        self.targets = (y.reshape(len(y), -1).astype(np.float64) if task.continuous or task.multi_label
                        else np.eye(n_out)[y])
        if protocol == "knn":
            self.idx, self.d2 = neighbours
            self.k = min(knn_k, len(y))
            self.scores = knn.votes(self.idx, self.d2, self.targets, self.k)
            self.models = None
        elif task.continuous:
            from sklearn.linear_model import RidgeCV

            ridge = RidgeCV(alphas=ALPHAS).fit(a, y)
            self.models = [linear.RidgeRefit(a, y, ridge.coef_, ridge.intercept_, float(ridge.alpha_))]
            self.scores = self.models[0].predict(b, np.ones((1, len(y))))[0]
        else:
            columns = [y[:, j] for j in range(y.shape[1])] if task.multi_label else [y]
            self.models, self.b = [], b
            for col in columns:
                if len(np.unique(col)) < 2:  # one class seen (a rare label at a small fraction): it gets 1
                    self.models.append(int(col[0]))
                    continue
                c = choose_c(a, col, groups, seed, max_rows)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    coef, icpt = linear.fit_logistic(a, col, c)
                self.models.append(linear.LogisticRefit(a, col, coef, icpt, c))
            self.scores = self._logistic(np.ones((1, len(y))))[0]

    def _logistic(self, counts) -> np.ndarray:
        parts = []
        for model in self.models:
            if isinstance(model, int):
                k = 2 if self.task.multi_label else self.targets.shape[1]
                p = np.zeros((len(counts), len(self.b), k))
                p[:, :, model] = 1.0
            else:
                p = model.proba(self.b, counts)
            parts.append(p[:, :, 1] if self.task.multi_label else p)
        return np.stack(parts, axis=2) if self.task.multi_label else parts[0]

    def resampled(self, counts: np.ndarray) -> np.ndarray:
        if self.models is None:
            return knn.resampled_votes(self.idx, self.d2, self.targets, self.k, counts)
        if self.task.continuous:
            return self.models[0].predict(self.b, counts)
        return self._logistic(counts)

    def decide(self, scores: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
        """Predicted classes [b, m] (multi-label [b, m, K] 0/1): the largest probability over its share of the
        (resampled) training labels, which maximises balanced accuracy when the probabilities are calibrated."""
        if self.task.continuous:
            return None
        prior = (np.asarray(counts, np.float64) @ self.targets) / np.maximum(counts.sum(1, keepdims=True), 1)
        prior = np.maximum(prior, 1e-12)[:, None, :]  # [b, 1, K]
        if self.task.multi_label:
            return (scores / prior > (1 - scores) / np.maximum(1 - prior, 1e-12)).astype(np.int64)
        return np.argmax(scores / prior, axis=2)
