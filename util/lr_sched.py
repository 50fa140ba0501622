"""Learning-rate schedule: linear warmup, then half-cycle cosine decay, set every iteration."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Schedule:
    """Peak `lr`, reached after `warmup_epochs`, then cosine decay to `min_lr` at `epochs`."""
    lr: float
    epochs: int
    warmup_epochs: float = 0
    min_lr: float = 0.0


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, args: Schedule) -> float:
    """Set the lr of every param group for a (fractional) epoch and return the base lr.

    Linear warmup from 0 to `args.lr` over `args.warmup_epochs`, then half-cycle cosine from `args.lr` to
    `args.min_lr` (default 0) at `args.epochs`. Each group gets `lr * group.get('lr_scale', 1.0)`.

    Args:
        optimizer: optimizer whose groups may carry `lr_scale` (layer-wise decay).
        epoch: current epoch, e.g. `epoch + it / iters_per_epoch`.
        args: a Schedule (or any object with `lr`, `epochs`, `warmup_epochs` and optionally `min_lr`).
    """
    min_lr = getattr(args, "min_lr", 0.0)
    warmup = getattr(args, "warmup_epochs", 0)
    if epoch < warmup:
        lr = args.lr * epoch / warmup
    else:
        decay_epochs = args.epochs - warmup
        progress = min(1.0, (epoch - warmup) / decay_epochs) if decay_epochs > 0 else 1.0
        lr = min_lr + (args.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
