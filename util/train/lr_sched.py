"""Learning-rate schedule: linear warmup, then half-cycle cosine decay, set every iteration."""
from __future__ import annotations

import math

import torch

from util.train.settings import Schedule


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, schedule: Schedule) -> float:
    """Set the lr of every param group for a (fractional) epoch and return the base lr.

    Linear warmup from 0 to `schedule.lr` over `schedule.warmup_epochs`, then half-cycle cosine to
    `schedule.min_lr` at `schedule.epochs`: MAE's schedule exactly, so the published recipes reproduce (the very
    first step runs at lr 0 and only initialises AdamW's moments; util.train.settings.fit_warmup keeps a short run
    from spending the rest of its steps near 0). Each group gets `lr * group.get('lr_scale', 1.0)`.

    Args:
        optimizer: optimizer whose groups may carry `lr_scale` (layer-wise decay).
        epoch: current epoch, e.g. `epoch + it / iters_per_epoch`.
        schedule: the run's Schedule.
    """
    s = schedule
    if epoch < s.warmup_epochs:
        lr = s.lr * epoch / s.warmup_epochs
    else:
        decay_epochs = s.epochs - s.warmup_epochs
        progress = min(1.0, (epoch - s.warmup_epochs) / decay_epochs) if decay_epochs > 0 else 1.0
        lr = s.min_lr + (s.lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
