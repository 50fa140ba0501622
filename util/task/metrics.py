"""Evaluation metrics for classification and regression, on numpy arrays already gathered from all ranks (no
torch: main_evaluate.py uses them too). Segmentation Dice is in util.task.dice."""
from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn import metrics as skm

def _auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """AUROC of one binary problem; nan when y_true holds a single class."""
    if np.unique(y_true).size < 2:
        return float("nan")
    return float(skm.roc_auc_score(y_true, score))


def nanmean(values: list[float]) -> float:
    """Mean of the finite values; nan when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _check_rows(probs: np.ndarray, targets: np.ndarray, what: str) -> None:
    if probs.shape[0] == 0 or probs.shape[0] != targets.shape[0]:
        raise ValueError(f"{what}: expected probs and targets with the same non-zero number of rows, got probs "
                         f"{probs.shape} and targets {targets.shape}.")


def _check_names(probs: np.ndarray, label_names: list[str], what: str) -> None:
    if len(label_names) != probs.shape[1]:
        raise ValueError(f"{what}: expected {probs.shape[1]} label names, got {len(label_names)}.")


def _summary(out: dict, aurocs: dict) -> dict[str, float]:
    """A label whose targets hold a single class gets auroc nan and is left out of the macro 'auroc' (nan when no
    label is defined)."""
    out["auroc"] = nanmean(list(aurocs.values()))
    out.update({f"auroc_{name}": v for name, v in aurocs.items()})
    return out


def binary_metrics(probs: np.ndarray, targets: np.ndarray, label_names: list[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy, F1 of the positive class and AUROC of probs [N] (positive class) or [N, 2]
    against class indices [N]; `auroc_<name>` takes the last of label_names as the positive class (so ['Label']
    and ['neg', 'pos'] both work)."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    _check_rows(probs, targets, "binary_metrics")
    if not (probs.ndim == 1 or (probs.ndim == 2 and probs.shape[1] == 2)):
        raise ValueError(f"binary_metrics: expected probs [N] or [N, 2], got {probs.shape}.")
    pos = probs[:, 1] if probs.ndim == 2 else probs
    y = targets.astype(np.int64).reshape(-1)
    pred = (pos >= 0.5).astype(np.int64)
    with warnings.catch_warnings():  # single-class labels / predictions make sklearn warn; we return nan instead
        warnings.simplefilter("ignore")
        out = {"accuracy": float(skm.accuracy_score(y, pred)),
               "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
               "f1": float(skm.f1_score(y, pred, pos_label=1, zero_division=0))}
        return _summary(out, {str(label_names[-1]) if label_names else "1": _auroc(y, pos)})


def multiclass_metrics(probs: np.ndarray, targets: np.ndarray, label_names: list[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1 and one-vs-rest AUROC per class (and their macro mean) of softmax
    probs [N, K] against class indices [N]."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    _check_rows(probs, targets, "multiclass_metrics")
    if probs.ndim != 2 or targets.ndim != 1:
        raise ValueError(f"multiclass_metrics: expected probs [N, K] and targets [N], got {probs.shape} and "
                         f"{targets.shape}.")
    _check_names(probs, list(label_names), "multiclass_metrics")
    y, pred = targets.astype(np.int64), probs.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {"accuracy": float(skm.accuracy_score(y, pred)),
               "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
               "f1": float(skm.f1_score(y, pred, labels=np.arange(probs.shape[1]), average="macro",
                                        zero_division=0))}
        return _summary(out, {str(n): _auroc(y == k, probs[:, k]) for k, n in enumerate(label_names)})


def multilabel_metrics(probs: np.ndarray, targets: np.ndarray, label_names: list[str]) -> dict[str, float]:
    """Accuracy and balanced accuracy (means over labels), macro F1 and per-label AUROC of sigmoid probs [N, K]
    against 0/1 targets [N, K]."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    _check_rows(probs, targets, "multilabel_metrics")
    if probs.ndim != 2 or probs.shape != targets.shape:
        raise ValueError(f"multilabel_metrics: expected probs and targets of equal shape [N, K], got {probs.shape} "
                         f"and {targets.shape}.")
    _check_names(probs, list(label_names), "multilabel_metrics")
    y, pred = (targets > 0.5).astype(np.int64), (probs >= 0.5).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {"accuracy": float(np.mean(y == pred)),
               "balanced_accuracy": nanmean([float(skm.balanced_accuracy_score(y[:, k], pred[:, k]))
                                              for k in range(probs.shape[1])]),
               "f1": float(skm.f1_score(y, pred, average="macro", zero_division=0))}
        return _summary(out, {str(n): _auroc(y[:, k], probs[:, k]) for k, n in enumerate(label_names)})


def regression_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mean absolute error, root mean squared error and (when N > 1) R^2.

    Args:
        pred: [N] or [N, K] predictions.
        target: same shape as pred.
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.size == 0 or pred.size != target.size:
        raise ValueError(f"regression_metrics: expected pred and target with the same non-zero size, "
                         f"got {pred.shape} and {target.shape}.")
    pred = pred.reshape(target.shape[0], -1) if target.ndim > 0 else pred.reshape(1, -1)
    target = target.reshape(pred.shape)
    err = pred - target
    out = {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2)))}
    if pred.shape[0] > 1:
        out["r2"] = float(skm.r2_score(target, pred))
    return out


SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "f1", "auroc", "mae", "rmse", "r2", "dice")


def summary_line(metrics: dict, also: tuple[str, ...] = ()) -> str:
    """'loss 0.4123, accuracy 0.8750, ..., auroc 1.0000': an evaluation's loss and its task's summary metrics (and
    the keys in `also`, e.g. a --best_metric of one label), in that order; per-class and per-label values stay in
    log.txt. Metrics absent from `metrics` are left out."""
    keys = ["loss", *SUMMARY_METRICS, *(k for k in also if k not in SUMMARY_METRICS)]
    return ", ".join(f"{k.replace('_', ' ')} {metrics[k]:.4f}" for k in keys if k in metrics)

