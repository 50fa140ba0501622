"""The epoch skeleton both trainers run: train an epoch, let the script end it, checkpoint, log, stop if asked.

    for each epoch from the resume point:
        point the sampler and the dataset's augmentation at the epoch (and at the resume step)
        train one epoch of the objective (util.train.loop), with mid-epoch checkpoints and preemption
        say once how many volumes came from the cache
        the script's `end_epoch`: evaluate, pictures, the best epoch -> the log line and extra checkpoint paths
        write checkpoint-last.pth (and those paths), append log.txt and TensorBoard
        stop here when a stop was asked for
    wait for the last checkpoint write

What each checkpoint holds beyond the weights, optimizer, scaler, epoch and progress comes from the script's
`checkpoint_record()` (util.task.record.CheckpointRecord); the file names come from util.run_folder. The checkpoint writer belongs to the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from util.checkpoint import CheckpointWriter
from util.data.dataset import cache_use_line
from util.distributed import barrier, is_main_process
from util.logger import Pace, append_json_log
from util.run_folder import RunFolder
from util.task.record import CheckpointRecord, EpochProgress
from util.train.loop import Objective, TrainParts, train_one_epoch
from util.train.settings import RunOptions, TrainSettings
from util.train.trainer import begin_epoch, step_control


class EpochEnd(Protocol):
    """A script's part of the skeleton."""

    def checkpoint_record(self) -> CheckpointRecord:
        """What every checkpoint of the run holds besides the weights, optimizer, scaler, epoch and progress (which
        fit fills in): the flags, recipe, preprocessing, and for finetuning the meta, best epoch and metrics."""

    def end_epoch(self, epoch: int, stats: dict) -> tuple[dict, list[str]]:
        """After the epoch's training (`stats`: its loss, lr, ...): evaluate, draw, pick the best. Returns the
        log.txt line and the checkpoint paths to write besides checkpoint-last.pth. `epoch` counts from 0."""


@dataclass
class TrainData:
    """The training set, its sampler (seeded per epoch, resumable mid-epoch), its loader and the --cache_dir it reads
    (None: no cache)."""
    dataset: object
    sampler: object
    loader: object
    cache_dir: str | None = None


class Checkpoints:
    """The run's checkpoint files: rank 0 copies the state to the CPU (every rank waits for that) and a background
    thread writes it atomically while training goes on; `flush` waits until it is on disk."""

    def __init__(self, parts: TrainParts, base: Callable[[], CheckpointRecord]):
        self.parts, self.base, self.writer = parts, base, CheckpointWriter()

    def save(self, paths: list[str], epoch: int, progress: EpochProgress | None = None,
             background: bool = True) -> None:
        if is_main_process():
            p = self.parts
            rec = self.base().but(weights=p.model.state_dict(), optimizer=p.optimizer.state_dict(), epoch=epoch,
                                  scaler=p.scaler.state_dict(), progress=progress)
            self.writer.save(rec.to_dict(), paths, background)
        barrier()

    def flush(self) -> None:
        """Wait until every checkpoint is on disk (rank 0 writes; every rank waits), raising a failed write's error."""
        if is_main_process():
            self.writer.wait()
        barrier()

    def finish(self) -> None:
        """For `finally` blocks: let a pending write finish (this process only, no collective); a failure is
        printed, since another error is already on its way."""
        try:
            self.writer.wait(ctrl_c=False)  # after an interrupt, more Ctrl-C must not cut the write (SIGABRT at exit)
        except (OSError, RuntimeError) as e:
            print(f"WARNING: {e}", flush=True)


def fit(run: RunOptions, train: TrainSettings, parts: TrainParts, data: TrainData, objective: Objective,
        script: EpochEnd, start_epoch: int, progress: EpochProgress | None, tb) -> None:
    """Run the epochs from `start_epoch` (and `progress` inside it, after a mid-epoch resume) to the schedule's
    last epoch."""
    folder, control, pace = RunFolder(run.output_dir), step_control(run, train), Pace()
    checkpoints = Checkpoints(parts, script.checkpoint_record)
    epochs = train.schedule.epochs
    try:
        for epoch in range(start_epoch, epochs):
            begin_epoch(epoch, data.sampler, data.dataset, progress, train.batch_size)

            def mid_epoch(at: EpochProgress, final: bool, epoch=epoch) -> None:  # final: stopping, wait for it
                checkpoints.save([folder.last], epoch, progress=at, background=not final)

            stats = train_one_epoch(parts, data.loader, epoch, train, objective, tb, start=progress,
                                    control=control, checkpoint=mid_epoch, pace=pace)
            progress = None
            line = cache_use_line(data.dataset, data.cache_dir, train.device) if epoch == start_epoch else None
            if line and is_main_process():  # (every rank counts its reads)
                print(line)
            stats, also = script.end_epoch(epoch, stats)
            checkpoints.save([folder.last, *also], epoch)  # the file resume reads goes first
            if is_main_process():
                tb.scalars({k: v for k, v in stats.items() if k != "epoch"}, epoch + 1, prefix="epoch/")
                tb.flush()
                append_json_log(run.output_dir, stats)
            control.saved()  # checkpoint-last.pth of this epoch: the --save_every_minutes timer restarts
            if control.stop_requested() and epoch + 1 < epochs:
                checkpoints.flush()
                control.stop(epoch, None)
        checkpoints.flush()
    finally:
        checkpoints.finish()
        control.close()
        tb.close()
