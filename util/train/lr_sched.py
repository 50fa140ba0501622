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


def fit_warmup(warmup_epochs: float, epochs: int) -> tuple[float, str | None]:
    """The warmup a run of `epochs` can use: unchanged when shorter than the run, else half the run, so the lr
    reaches its peak and then decays instead of crawling up from 0 for the whole run. Returns (warmup, the one
    line saying it was shortened, or None)."""
    if warmup_epochs < epochs:
        return warmup_epochs, None
    fitted = epochs / 2
    return fitted, (f"--warmup_epochs {warmup_epochs:g} is not shorter than --epochs {epochs}: the lr warms up over "
                    f"the first {fitted:g} epochs instead, then decays (else it would stay near 0 the whole run).")


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, args: Schedule) -> float:
    """Set the lr of every param group for a (fractional) epoch and return the base lr.

    Linear warmup from 0 to `args.lr` over `args.warmup_epochs`, then half-cycle cosine from `args.lr` to
    `args.min_lr` (default 0) at `args.epochs`: MAE's schedule exactly, so the published recipes reproduce (the
    very first step runs at lr 0 and only initialises AdamW's moments; `fit_warmup` keeps a short run from
    spending the rest of its steps near 0). Each group gets `lr * group.get('lr_scale', 1.0)`.

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
