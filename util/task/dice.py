"""Segmentation Dice in two forms: `dice_per_class` for whole arrays, and `dice_stats` / `dice_from_stats`, whose
per-class counts can be summed across batches and ranks (e.g. with `torch.distributed.all_reduce`) before the ratio
is taken."""
from __future__ import annotations

import numpy as np
import torch

from util.task.metrics import nanmean


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
    out["dice"] = nanmean(list(out.values()))
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
