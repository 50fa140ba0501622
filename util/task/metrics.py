"""Evaluation metrics for classification, regression and segmentation.

Classification / regression functions take numpy arrays already gathered from all ranks.
Segmentation Dice comes in two forms: `dice_per_class` for whole arrays, and
`dice_stats` / `dice_from_stats` whose per-class counts can be summed across batches and ranks
(e.g. with `torch.distributed.all_reduce`) before the ratio is taken.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from sklearn import metrics as skm

CLASSIFICATION_MODES = ("binary", "multiclass", "multilabel")


def _auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """AUROC of one binary problem; nan when y_true holds a single class."""
    if np.unique(y_true).size < 2:
        return float("nan")
    return float(skm.roc_auc_score(y_true, score))


def _nanmean(values: list[float]) -> float:
    """Mean of the finite values; nan when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _check_classification(probs: np.ndarray, targets: np.ndarray, mode: str, label_names: list[str]) -> None:
    """Raise one-sentence ValueErrors for inconsistent classification inputs."""
    if mode not in CLASSIFICATION_MODES:
        raise ValueError(f"classification_metrics: mode must be one of {CLASSIFICATION_MODES}, got {mode!r}.")
    if probs.shape[0] == 0 or probs.shape[0] != targets.shape[0]:
        raise ValueError(f"classification_metrics: expected probs and targets with the same non-zero number of "
                         f"rows, got probs {probs.shape} and targets {targets.shape}.")
    if mode == "binary" and not (probs.ndim == 1 or (probs.ndim == 2 and probs.shape[1] == 2)):
        raise ValueError(f"classification_metrics: binary mode expects probs [N] or [N, 2], got {probs.shape}.")
    if mode == "multiclass" and (probs.ndim != 2 or targets.ndim != 1):
        raise ValueError(f"classification_metrics: multiclass mode expects probs [N, K] and targets [N], "
                         f"got {probs.shape} and {targets.shape}.")
    if mode == "multilabel" and (probs.ndim != 2 or probs.shape != targets.shape):
        raise ValueError(f"classification_metrics: multilabel mode expects probs and targets of equal shape "
                         f"[N, K], got {probs.shape} and {targets.shape}.")
    if mode != "binary" and len(label_names) != probs.shape[1]:
        raise ValueError(f"classification_metrics: expected {probs.shape[1]} label names, got {len(label_names)}.")


def classification_metrics(probs: np.ndarray, targets: np.ndarray, mode: str,
                           label_names: list[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy, F1 and (per-label and macro) AUROC.

    Args:
        probs: 'binary': [N] positive-class probability or [N, 2] softmax; 'multiclass': [N, K] softmax;
            'multilabel': [N, K] sigmoid.
        targets: int [N] class indices ('binary', 'multiclass') or 0/1 [N, K] ('multilabel').
        mode: 'binary', 'multiclass' or 'multilabel'.
        label_names: names used in the `auroc_<name>` keys: one per class / label; for 'binary' the
            last name is taken as the positive class (so ['Label'] and ['neg', 'pos'] both work).

    Returns:
        {'accuracy', 'balanced_accuracy', 'f1', 'auroc', 'auroc_<name>'...}. A label whose targets hold a
        single class gets auroc nan and is left out of the macro 'auroc' (nan when no label is defined).
        'binary': F1 of the positive class. 'multiclass': macro F1, one-vs-rest AUROC per class.
        'multilabel': accuracy and balanced accuracy are means over labels, F1 is macro over labels.
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    _check_classification(probs, targets, mode, list(label_names))
    with warnings.catch_warnings():  # single-class labels / predictions make sklearn warn; we return nan instead
        warnings.simplefilter("ignore")
        if mode == "binary":
            pos = probs[:, 1] if probs.ndim == 2 else probs
            y = targets.astype(np.int64).reshape(-1)
            pred = (pos >= 0.5).astype(np.int64)
            out = {"accuracy": float(skm.accuracy_score(y, pred)),
                   "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
                   "f1": float(skm.f1_score(y, pred, pos_label=1, zero_division=0))}
            aurocs = {str(label_names[-1]) if label_names else "1": _auroc(y, pos)}
        elif mode == "multiclass":
            y = targets.astype(np.int64)
            pred = probs.argmax(axis=1)
            labels = np.arange(probs.shape[1])
            out = {"accuracy": float(skm.accuracy_score(y, pred)),
                   "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
                   "f1": float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0))}
            aurocs = {str(n): _auroc(y == k, probs[:, k]) for k, n in enumerate(label_names)}
        else:
            y = (targets > 0.5).astype(np.int64)
            pred = (probs >= 0.5).astype(np.int64)
            per_label = range(probs.shape[1])
            out = {"accuracy": float(np.mean(y == pred)),
                   "balanced_accuracy": _nanmean([float(skm.balanced_accuracy_score(y[:, k], pred[:, k]))
                                                  for k in per_label]),
                   "f1": float(skm.f1_score(y, pred, average="macro", zero_division=0))}
            aurocs = {str(n): _auroc(y[:, k], probs[:, k]) for k, n in enumerate(label_names)}
    out["auroc"] = _nanmean(list(aurocs.values()))
    out.update({f"auroc_{name}": v for name, v in aurocs.items()})
    return out


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


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Tensor view of an array (numpy arrays made contiguous first: flipped views have negative strides)."""
    return x if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))


def dice_stats(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class Dice counts that can be summed over batches and ranks.

    Args:
        pred: int label map [N, D, H, W] or [D, H, W] with values in [0, num_classes).
        target: int label map of the same shape.
        num_classes: number of classes including background.

    Returns:
        float64 [num_classes, 3] on pred's device: (intersection, predicted voxels, target voxels) per class.
    """
    pred, target = _as_tensor(pred), _as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"dice_stats: expected pred and target of the same shape, "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}.")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError("dice_stats: expected integer label maps (take argmax of the logits first).")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).to(pred.device).long()
    if pred.numel():
        lo = torch.minimum(pred.min(), target.min()).item()
        hi = torch.maximum(pred.max(), target.max()).item()
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"dice_stats: expected labels in [0, {num_classes}), found values in [{lo}, {hi}].")
    # Joint histogram: confusion[t, p] = number of voxels with target t and prediction p.
    confusion = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes).double()
    return torch.stack([confusion.diagonal(), confusion.sum(0), confusion.sum(1)], dim=1)


def dice_from_stats(stats: torch.Tensor, include_background: bool = False) -> dict[str, float]:
    """Dice per class and their mean from (summed) `dice_stats` counts.

    Args:
        stats: [num_classes, 3] (intersection, predicted voxels, target voxels).
        include_background: also report class 0.

    Returns:
        {'dice_<c>': float, ..., 'dice': mean}. A class absent from both prediction and target gets nan
        and is left out of the mean (which is nan when every class is absent).
    """
    stats = torch.as_tensor(stats).detach().double().cpu()
    if stats.ndim != 2 or stats.shape[1] != 3:
        raise ValueError(f"dice_from_stats: expected stats of shape [num_classes, 3], got {tuple(stats.shape)}.")
    out: dict[str, float] = {}
    for c in range(0 if include_background else 1, stats.shape[0]):
        inter, p_sum, t_sum = stats[c].tolist()
        denom = p_sum + t_sum
        out[f"dice_{c}"] = 2.0 * inter / denom if denom > 0 else float("nan")
    out["dice"] = _nanmean(list(out.values()))
    return out


def dice_per_class(pred_labels: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, num_classes: int,
                   include_background: bool = False) -> dict[str, float]:
    """Dice per class and mean Dice of integer label maps.

    Args:
        pred_labels: int [N, D, H, W] or [D, H, W] predicted labels.
        target: int label map of the same shape.
        num_classes: number of classes including background (class 0).
        include_background: also score class 0.

    Returns:
        {'dice_<c>': float, ..., 'dice': mean over classes present in prediction or target}.
    """
    stats = dice_stats(_as_tensor(pred_labels), _as_tensor(target), num_classes)
    return dice_from_stats(stats, include_background=include_background)


SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "f1", "auroc", "mae", "rmse", "r2", "dice")


def summary_line(metrics: dict, also: tuple[str, ...] = ()) -> str:
    """'loss 0.4123, accuracy 0.8750, ..., auroc 1.0000': an evaluation's loss and its task's summary metrics (and
    the keys in `also`, e.g. a --best_metric of one label), in that order; per-class and per-label values stay in
    log.txt. Metrics absent from `metrics` are left out."""
    keys = ["loss", *SUMMARY_METRICS, *(k for k in also if k not in SUMMARY_METRICS)]
    return ", ".join(f"{k.replace('_', ' ')} {metrics[k]:.4f}" for k in keys if k in metrics)
