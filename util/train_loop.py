"""The training epoch shared by pretraining and finetuning: accumulation, mixed precision, lagged checks, logging."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch

from util import lr_sched
from util.cli import autocast
from util.distributed import all_gather_objects, all_reduce_mean
from util.faults import fault_point
from util.logger import Progress


class NonFiniteLossError(RuntimeError):
    pass


def _check_finite(pending, epoch: int, describe: Callable | None) -> None:
    """Raise if the loss of an earlier step was not finite (checked one step late so the GPU never waits)."""
    if pending is None:
        return
    loss, step, batch = pending
    if not math.isfinite(float(loss)):
        where = f"; batch files: {describe(batch)}" if describe else ""
        raise NonFiniteLossError(
            f"Loss became {float(loss)} at epoch {epoch}, step {step}{where}. The run stopped and the last good "
            f"checkpoint was kept; lower --blr, use --clip_grad, or check these volumes.")


def train_one_epoch(model, loader, optimizer, scaler, epoch: int, args, compute_loss: Callable, tb=None,
                    batch_ids: Callable | None = None, describe: Callable | None = None) -> dict:
    """One epoch. `compute_loss(model, batch) -> scalar loss` runs under autocast.

    Gradient accumulation: the loss is divided by accum_iter, DDP gradient sync happens only on the last micro-step,
    and gradients are zeroed once per optimizer step. Loss and grad norm reach the host only every print_freq steps.
    `batch_ids(batch) -> list[int]` records which samples this rank saw (gathered at the end, to log coverage);
    `describe(batch) -> str` names the batch's files if its loss is not finite.
    """
    model.train()
    device, n_steps = args.device, len(loader)
    progress = Progress(n_steps, f"Epoch [{epoch}]", args.print_freq, args.batch_size * args.world_size)
    loss_sum, gnorm = torch.zeros((), device=device), torch.zeros((), device=device)
    count, pending, lr, t0, seen = 0, None, 0.0, time.time(), []
    optimizer.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    for it, batch in enumerate(loader):
        fault_point(f"step:{epoch}:{it}")
        last_micro = (it + 1) % args.accum_iter == 0 or it + 1 == n_steps
        if it % args.accum_iter == 0:
            lr = lr_sched.adjust_learning_rate(optimizer, it / n_steps + epoch, args)
        sync_ctx = model.no_sync() if (args.distributed and not last_micro) else contextlib.nullcontext()
        with sync_ctx:
            with autocast(args.precision, device):
                loss = compute_loss(model, batch)
            scaler.scale(loss / args.accum_iter).backward()
        if last_micro:
            scaler.unscale_(optimizer)
            gnorm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        _check_finite(pending, epoch, describe)
        pending = (loss.detach(), it, batch)
        if batch_ids is not None:
            seen.extend(batch_ids(batch))
        loss_sum += pending[0]
        count += 1
        if progress.due(it):
            _log_progress(progress, it, loss_sum / count, lr, gnorm, tb, epoch * n_steps + it, device)
    _check_finite(pending, epoch, describe)
    stats = {"loss": all_reduce_mean(loss_sum / max(count, 1), device), "lr": lr}
    volumes = count * args.batch_size * args.world_size
    if batch_ids is not None:  # a few ints per rank: proves the ranks saw disjoint volumes
        per_rank = all_gather_objects(seen)
        volumes = sum(len(s) for s in per_rank)
        stats.update(volumes=volumes, unique_volumes=len(set().union(*map(set, per_rank))))
    stats["volumes_per_s"] = volumes / (time.time() - t0)
    return stats


def _log_progress(progress, it, loss_mean, lr, gnorm, tb, step, device) -> None:
    loss_avg = all_reduce_mean(loss_mean, device)
    vps = progress.show(it, loss=loss_avg, lr=lr, grad_norm=float(gnorm))
    if tb is not None:
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else 0.0
        tb.scalars({"loss": loss_avg, "lr": lr, "grad_norm": float(gnorm), "volumes_per_s": vps,
                    "gpu_mem_gib": mem}, step, prefix="train/")
