"""The training epoch shared by pretraining and finetuning: accumulation, mixed precision, per-step seeding,
host checks at print steps only, mid-epoch checkpoints and preemption, logging.

What a step computes is the engine's `Objective` (engine_pretrain.MaskedReconstruction, engine_finetune.Supervised):
its `loss(model, batch)` is the one place the loss is written; the loop only runs it."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from util.train import lr_sched
from util.distributed import all_gather_objects, all_reduce_mean, get_rank
from util.errors import UserError
from util.faults import fault_point
from util.logger import Progress
from util.runtime import autocast, step_seed
from util.task.record import EpochProgress
from util.train.settings import TrainSettings


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the message names the epoch, the step and the batch's files."""


@dataclass
class TrainParts:
    """What a run trains, by name: `model` (unwrapped: state_dict, evaluation), `ddp` (what the step runs: the DDP
    wrapper, or the model itself in one process), its optimizer and grad scaler."""
    model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


class Objective(Protocol):
    """An engine's part of a training step. With `tracks_batches` the loop records `batch_ids` (every rank must
    agree: the records are gathered)."""
    tracks_batches: bool

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        """The scalar loss of `batch` (run under autocast)."""

    def batch_ids(self, batch) -> list[int] | None:
        """The dataset indices of the batch (recorded to prove ranks see disjoint volumes), or None."""

    def describe(self, batch) -> list[str] | None:
        """The batch's file names (named when its loss is not finite), or None."""


class FiniteWatch:
    """The losses of the steps since the last host check, kept on the device and read in one go at the print steps,
    before a checkpoint and at the end of the epoch, so a steady-state step never waits for the device. A non-finite
    loss raises NonFiniteLossError naming the first such step and its batch's files; no checkpoint is written after
    it, so the last good one is kept."""

    def __init__(self, epoch: int, describe: Callable | None):
        self.epoch, self.describe = epoch, describe
        self.losses, self.steps, self.names = [], [], []

    def add(self, loss: torch.Tensor, step: int, batch) -> None:
        self.losses.append(loss)
        self.steps.append(step)
        self.names.append(self.describe(batch) if self.describe else None)

    def check(self) -> None:
        if not self.losses:
            return
        losses = torch.stack(self.losses).float()
        bad = (~torch.isfinite(losses)).nonzero()  # the one host read of this check
        if len(bad):
            i = int(bad[0, 0])
            where = f"; batch files: {self.names[i]}" if self.names[i] is not None else ""
            raise NonFiniteLossError(
                f"Loss became {float(losses[i])} at epoch {self.epoch + 1}, step {self.steps[i]}{where}. The run "
                f"stopped and the last good checkpoint was kept; lower --blr, use --clip_grad, or check these volumes.")
        self.losses, self.steps, self.names = [], [], []


def train_one_epoch(parts: TrainParts, loader, epoch: int, s: TrainSettings, objective: Objective, tb=None,
                    start: EpochProgress | None = None, control=None, checkpoint: Callable | None = None,
                    pace=None) -> dict:
    """One epoch (or its rest, from `start.step`) of `objective.loss(parts.ddp, batch)`, run under autocast.

    Every micro-step reseeds torch from (seed, epoch, step, rank), so masks and drop paths replay exactly after a
    resume. Accumulation divides the loss by accum_iter, syncs DDP gradients on the last micro-step only and zeroes
    gradients once per optimizer step. Loss and grad norm reach the host only at the print steps, before a checkpoint
    and at the end (FiniteWatch): a steady-state step never waits for the device.
    `control` (util.train.preempt.StepControl) decides after each optimizer step whether to write a mid-epoch checkpoint
    (`checkpoint(progress, final)`, final=True when stopping: it must be on disk when it returns) and whether to
    stop (then util.train.preempt.Preempted is raised after the checkpoint).
    """
    model, optimizer, scaler = parts.ddp, parts.optimizer, parts.scaler
    model.train()
    device, n_steps = s.device, len(loader) + (start.step if start else 0)
    start = start or EpochProgress()
    progress = Progress(n_steps, epoch, s.schedule.epochs, s.print_freq, s.batch_size * s.world_size, start.step,
                        pace, quiet_last=s.epoch_line)  # pace: the run's util.logger.Pace, for a steady ETA
    loss_sum = torch.full((), start.loss_sum, device=device, dtype=torch.float64)
    gnorm = torch.zeros((), device=device)
    count, lr, t0, seen = start.count, 0.0, time.time(), list(start.seen)
    watch = FiniteWatch(epoch, objective.describe)
    optimizer.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    for it, batch in enumerate(loader, start=start.step):
        fault_point(f"step:{epoch}:{it}")
        torch.manual_seed(step_seed(s.seed, epoch, it, s.rank))
        last_micro = (it + 1) % s.accum_iter == 0 or it + 1 == n_steps
        if it % s.accum_iter == 0:
            lr = lr_sched.adjust_learning_rate(optimizer, it / n_steps + epoch, s.schedule)
        sync_ctx = model.no_sync() if (s.distributed and not last_micro) else contextlib.nullcontext()
        with sync_ctx:
            with autocast(s.precision, device):
                loss = objective.loss(model, batch)
            scaler.scale(loss / s.accum_iter).backward()
        if last_micro:
            scaler.unscale_(optimizer)
            gnorm = torch.nn.utils.clip_grad_norm_(params, s.clip_grad or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        watch.add(loss, it, batch)
        if objective.tracks_batches:
            seen.extend(objective.batch_ids(batch))
        loss_sum += loss.double()
        count += 1
        if progress.due(it):
            watch.check()
            _log_progress(progress, it, loss_sum / count, lr, gnorm, tb, epoch * n_steps + it, device)
        if last_micro and control is not None and it + 1 < n_steps:
            save, stop = control.decide(it + 1)
            if save or stop:
                watch.check()
                checkpoint(EpochProgress(it + 1, all_reduce_mean(loss_sum, device), count,
                                         _gathered(seen) if objective.tracks_batches else []), stop)
                control.saved()
            if stop:
                control.stop(epoch, it + 1)
    watch.check()
    stats = {"loss": all_reduce_mean(loss_sum / max(count, 1), device), "lr": lr}
    volumes = (count - start.count) * s.batch_size * s.world_size
    if objective.tracks_batches:  # a few ints per rank: proves the ranks saw disjoint volumes
        per_rank = all_gather_objects(seen)
        stats.update(volumes=sum(len(p) for p in per_rank), unique_volumes=len(set().union(*map(set, per_rank))))
    stats["volumes_per_s"] = volumes / max(time.time() - t0, 1e-9)
    return stats


def _gathered(seen: list) -> list:
    """Every rank's seen indices, kept on rank 0 only (rank 0 alone restores them after a resume)."""
    parts = all_gather_objects(seen)
    return [i for p in parts for i in p] if get_rank() == 0 else []


def _log_progress(progress, it, loss_mean, lr, gnorm, tb, step, device) -> None:
    loss_avg = all_reduce_mean(loss_mean, device)
    vps = progress.show(it, loss=loss_avg, lr=lr, grad_norm=float(gnorm))
    if tb is not None:
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else 0.0
        tb.scalars({"loss": loss_avg, "lr": lr, "grad_norm": float(gnorm), "volumes_per_s": vps,
                    "gpu_mem_gib": mem}, step, prefix="train/")
