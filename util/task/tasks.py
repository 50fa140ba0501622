"""Task semantics in one place: modes, label parsing, outputs, targets, losses, metrics, probability columns.

Modes: 'binary' (one logit, BCE), 'multiclass' (K logits, softmax CE), 'multilabel' (K logits, BCE per label
column), 'regression' (K values, MSE), 'segmentation' (K-class label maps, DiceCE). A pretraining checkpoint used
for prediction is mode 'embedding' (no head). Adding a task type means adding it here (and a head in models_build).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from util.errors import UserError
from util.task.metrics import classification_metrics, regression_metrics
from util.data.path_table import numeric_columns, where

MODES = ("binary", "multiclass", "multilabel", "regression", "segmentation")
LOWER_IS_BETTER = ("loss", "mae", "rmse")


def mode_of(task: str, regression: bool, n_label_columns: int, nb_classes: int) -> str:
    """The mode of a finetuning run from its flags and its classes."""
    if task == "segmentation":
        return "segmentation"
    if regression:
        return "regression"
    if n_label_columns > 1:
        return "multilabel"
    return "binary" if nb_classes <= 2 else "multiclass"


def nb_outputs(mode: str, nb_classes: int, n_label_columns: int) -> int:
    """Width of the head: 1 logit for binary, one per label column (multilabel, regression), else one per class."""
    if mode == "binary":
        return 1
    if mode in ("multilabel", "regression"):
        return n_label_columns
    return nb_classes


def parse_labels(table: pd.DataFrame, columns: list[str], csv_path: str, regression: bool, multilabel: bool,
                 nb_classes: int | None) -> dict:
    """Targets and class bookkeeping of a labelled table.

    Returns {'targets': int64 [N] class indices, float32 [N, K] multilabel, float32 [N] or [N, K] regression;
    'nb_classes', 'label_names', 'class_counts' (None for regression)}. Classes are numbered 0..K-1; K is
    max(label) + 1 (at least 2) unless nb_classes is given.
    """
    if regression:
        y = numeric_columns(table, columns, csv_path, "float").astype(np.float32)
        return dict(targets=y[:, 0] if len(columns) == 1 else y, nb_classes=len(columns),
                    label_names=list(columns), class_counts=None)
    if multilabel:
        y = numeric_columns(table, columns, csv_path, "binary").astype(np.float32)
        return dict(targets=y, nb_classes=len(columns), label_names=list(columns),
                    class_counts=[int(c) for c in (y > 0.5).sum(0)])
    y = numeric_columns(table, columns, csv_path, "class")[:, 0].astype(np.int64)
    k = int(nb_classes or max(2, int(y.max()) + 1))
    if y.max() >= k:
        i = int(np.argmax(y >= k))
        raise UserError(f"{csv_path}: {where(int(table.index[i]))}, column '{columns[0]}': class {y[i]} is >= "
                         f"nb_classes={k}.")
    return dict(targets=y, nb_classes=k, label_names=[str(c) for c in range(k)],
                class_counts=[int(c) for c in np.bincount(y, minlength=k)])


def prepare_target(target: torch.Tensor, mode: str, device) -> torch.Tensor:
    """Dataset targets to loss targets: binary [N,1] float, multiclass [N] long, multilabel/regression [N,K]
    float, segmentation [N,1,D,H,W] long."""
    target = target.to(device, non_blocking=True)
    n = target.shape[0]
    if mode == "multiclass":
        return target.long().reshape(n)
    if mode == "segmentation":
        return target.long().unsqueeze(1)
    return target.float().reshape(n, -1)


def empty_target(mode: str, k: int) -> torch.Tensor:
    """A 0-row loss target (a rank that holds no evaluation sample)."""
    return torch.zeros(0, dtype=torch.long) if mode == "multiclass" else torch.zeros(0, k)


def _pos_weight(spec, counts: np.ndarray, n: int, k: int):
    """--pos_weight as a tensor [k]: 'auto' = negatives / positives per column, or 1 or k numbers."""
    if not spec:
        return None
    if len(spec) == 1 and str(spec[0]).lower() == "auto":
        pos = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
        return torch.tensor((n - pos) / pos, dtype=torch.float32)
    try:
        values = [float(v) for v in spec]
    except ValueError:
        raise UserError(f"--pos_weight takes 'auto' or numbers, got {spec}.") from None
    if len(values) not in (1, k):
        raise UserError(f"--pos_weight takes 1 or {k} numbers (one per label column), got {len(values)}.")
    return torch.tensor(values * (k // len(values)), dtype=torch.float32)


def loss_weights(mode: str, targets, class_counts, pos_weight=None, class_weights: str = "none") -> dict:
    """Class-imbalance weights from the training labels: {'pos_weight': [K] or None, 'class_weight': [K] or None}.

    pos_weight (binary/multilabel BCE): 'auto' = negatives / positives per column, or explicit numbers.
    class_weights 'auto' (multiclass CE): N / (K * count_k).
    """
    out = {"pos_weight": None, "class_weight": None}
    if mode == "multiclass" and class_weights == "auto":
        counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
        out["class_weight"] = torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)
        print(f"Class weights (auto, from training counts {list(map(int, counts))}): "
              f"{[round(float(w), 3) for w in out['class_weight']]}")
    elif mode in ("binary", "multilabel") and pos_weight:
        y = np.asarray(targets, dtype=np.float64)
        counts = (y.reshape(len(y), -1) > 0.5).sum(0)
        out["pos_weight"] = _pos_weight(pos_weight, counts, len(y), len(counts))
        print(f"BCE pos_weight: {[round(float(w), 3) for w in out['pos_weight']]}")
    return out


def build_criterion(mode: str, smoothing: float = 0.0, weights: dict | None = None, device="cpu") -> nn.Module:
    """Loss for `mode`: BCEWithLogits (binary, multilabel), CE with label smoothing (multiclass), MSE (regression),
    DiceCE with softmax and one-hot targets (segmentation). `weights` comes from `loss_weights`."""
    weights = weights or {}
    if mode == "segmentation":
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)
    if mode == "regression":
        return nn.MSELoss()
    if mode == "multiclass":
        return nn.CrossEntropyLoss(weight=weights.get("class_weight"), label_smoothing=smoothing).to(device)
    return nn.BCEWithLogitsLoss(pos_weight=weights.get("pos_weight")).to(device)


def logits_to_probs(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-class probabilities [N, K] from logits: softmax (multiclass), sigmoid (binary/multilabel).

    Binary heads have one logit; the result has two columns (P(0), P(1)). Regression returns the values.
    """
    logits = logits.float()
    if mode == "multiclass":
        return logits.softmax(-1)
    if mode == "binary":
        p = torch.sigmoid(logits.reshape(-1, 1))
        return torch.cat([1 - p, p], dim=1)
    if mode == "multilabel":
        return torch.sigmoid(logits)
    return logits


def compute_metrics(logits: torch.Tensor, targets: torch.Tensor, meta: dict) -> dict:
    """Metrics of gathered outputs: logits [N, nb_outputs] and loss targets (see prepare_target)."""
    mode = meta["mode"]
    if mode == "regression":
        out = regression_metrics(logits.numpy(), targets.numpy())
        if targets.shape[1] > 1:
            for k, name in enumerate(meta["label_names"]):
                out[f"mae_{name}"] = float((logits[:, k] - targets[:, k]).abs().mean())
        return out
    probs = logits_to_probs(logits, mode).numpy()
    y = targets.numpy()
    if mode == "binary":
        y = y.reshape(-1).round().astype(np.int64)
    return classification_metrics(probs, y, mode, meta["label_names"])


def default_best_metric(mode: str) -> str:
    return {"regression": "mae", "segmentation": "dice"}.get(mode, "auroc")


def is_better(value: float, best: float | None, metric: str) -> bool:
    """True when `value` improves on `best` (None: nothing yet). Non-finite values never improve."""
    if not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    lower = metric.split("_")[0] in LOWER_IS_BETTER  # 'mae_<label>' of a multi-output regression too
    return value < best if lower else value > best


def output_columns(meta: dict) -> list[str]:
    """Names of the probability / value columns of a finetuned checkpoint, one per output column.

    Binary and multiclass heads give one column per class (the checkpoint's label names when there is one per
    class, else the class index); multi-label and regression heads give one column per label column.
    """
    mode, names = meta["mode"], [str(n) for n in meta.get("label_names") or []]
    if mode in ("multilabel", "regression"):
        k = int(meta["nb_outputs"])
        return names if len(names) == k else [str(i) for i in range(k)]
    k = 2 if mode == "binary" else int(meta["nb_classes"])
    return names if len(names) == k else [str(i) for i in range(k)]


def predicted_label(mode: str, names: list[str], probs: np.ndarray) -> str:
    """The `pred` cell: the most probable class, or the ';'-joined labels with p >= 0.5 (multilabel)."""
    if mode == "multilabel":
        return ";".join(n for n, p in zip(names, probs) if p >= 0.5)
    return names[int(np.argmax(probs))]
