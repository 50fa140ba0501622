"""Training logs: a progress line on rank 0, TensorBoard scalars/images, and log.txt with one JSON line per epoch."""
from __future__ import annotations

import collections
import datetime
import json
import os
import time

from util.distributed import is_main_process
from util.run_folder import RunFolder


class Pace:
    """How long a step and a whole epoch take in this run, carried from epoch to epoch for a steady ETA.

    Step time: total seconds over total steps of the intervals between progress lines, the most recent ones
    covering at least `window_steps` steps; each epoch's first interval is left out (loader start-up, first-step
    compilation), and kept as the epoch's start-up time. Epoch time: from the start of one epoch to the start of
    the next (training, evaluation, pictures and checkpoints), the mean of the last `window_epochs` full epochs;
    the run's first epoch is left out once a second one is known (it fills the cache and compiles). Before an
    epoch has been measured: the start-up time plus the step time for the other steps.
    """

    def __init__(self, window_steps: int = 50, window_epochs: int = 5):
        self.window_steps, self.window_epochs = window_steps, window_epochs
        self.intervals: collections.deque = collections.deque()  # (steps, seconds)
        self.epoch_seconds: list[float] = []
        self._started: tuple | None = None  # (epoch, time, started at its first step)
        self.startup: tuple[int, float] | None = None  # (steps, seconds) of the latest epoch's first interval

    def start_epoch(self, epoch: int, now: float, first_step: int = 0) -> None:
        if self._started is not None and self._started[0] == epoch - 1 and self._started[2]:
            self.epoch_seconds.append(now - self._started[1])
        self._started = (epoch, now, first_step == 0)

    def add(self, steps: int, seconds: float) -> None:
        self.intervals.append((steps, seconds))
        while len(self.intervals) > 1 and sum(n for n, _ in self.intervals) - self.intervals[0][0] >= \
                self.window_steps:
            self.intervals.popleft()

    def step_seconds(self) -> float | None:
        steps = sum(n for n, _ in self.intervals)
        return sum(t for _, t in self.intervals) / steps if steps else None

    def epoch_time(self) -> float | None:
        full = self.epoch_seconds[1:] or self.epoch_seconds
        recent = full[-self.window_epochs:]
        return sum(recent) / len(recent) if recent else None

    def eta(self, steps_left: int, total_steps: int, epochs_left: int, now: float) -> tuple[float, float] | None:
        """(seconds left in this epoch's steps, seconds left in the run), or None while nothing is measured."""
        step, epoch = self.step_seconds(), self.epoch_time()
        if step is not None:
            left = step * steps_left
        elif epoch is not None and self._started is not None:
            left = max(0.0, epoch - (now - self._started[1]))
        else:
            return None
        if epoch is None:
            n, seconds = self.startup or (0, 0.0)
            epoch = seconds + step * max(0, total_steps - n)
        return left, left + epochs_left * epoch


class Progress:
    """Prints `epoch i/N [it/n] key value ... vol/s, eta of the epoch and of the run` every `print_freq` steps
    on rank 0 (epochs count from 1 here, in file names and in log.txt). Pass the run's `pace` to every epoch's
    Progress so the ETA uses the steady step and epoch times measured so far (see Pace)."""

    def __init__(self, total: int, epoch: int, epochs: int, print_freq: int = 10, batch_volumes: int = 1,
                 start_step: int = 0, pace: Pace | None = None, clock=time.monotonic, quiet_last: bool = False):
        self.total, self.epoch, self.epochs, self.print_freq = total, epoch, epochs, max(1, print_freq)
        self.quiet_last = quiet_last  # the epoch's last step is measured, not printed (the script's line follows)
        self.batch_volumes, self.clock = batch_volumes, clock
        self.pace = pace if pace is not None else Pace()
        self.start = self.last = clock()
        self.first_it = self.last_it = start_step
        self.pace.start_epoch(epoch, self.start, start_step)

    def due(self, it: int) -> bool:
        return it % self.print_freq == 0 or it == self.total - 1

    def show(self, it: int, **values) -> float:
        """Print a line; returns the volumes/s since the previous line."""
        now = self.clock()
        steps, seconds = it + 1 - self.last_it, now - self.last
        vps = steps * self.batch_volumes / max(seconds, 1e-9)
        if self.last_it > self.first_it:  # not the epoch's first interval (loader start-up)
            self.pace.add(steps, seconds)
        elif self.first_it == 0:
            self.pace.startup = (steps, seconds)
        self.last, self.last_it = now, it + 1
        eta = self.pace.eta(self.total - it - 1, self.total, self.epochs - self.epoch - 1, now)
        eta_text = f"eta epoch {_hms(eta[0])} run {_hms(eta[1])}" if eta else "eta measuring"
        parts = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        if not (self.quiet_last and it == self.total - 1):
            print(f"epoch {self.epoch + 1}/{self.epochs} [{it + 1}/{self.total}] {parts} vol/s {vps:.2f} {eta_text}",
                  flush=True)
        return vps


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class TBLogger:
    """TensorBoard writer on rank 0 only; a no-op elsewhere or when log_dir is None."""

    def __init__(self, log_dir: str | None):
        self.writer = None
        if log_dir and is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(prefix + k, v, step)

    def image(self, tag: str, img_hwc, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, img_hwc, step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def append_json_log(output_dir: str, stats: dict) -> None:
    """Append one JSON line to output_dir/log.txt (rank 0 only)."""
    if output_dir and is_main_process():
        with open(RunFolder(output_dir).log, "a") as f:
            f.write(json.dumps(stats) + "\n")


def describe_outputs(output_dir: str, log_dir: str | None = None, pictures: bool = False, demo: str | None = None) -> str:
    """The start-up lines saying where a training run's outputs go."""
    lines = [f"Outputs: checkpoints and log.txt in {output_dir}/"]
    if log_dir:
        lines.append(f"  TensorBoard: tensorboard --logdir {log_dir}")
    if pictures:
        lines.append(f"  reconstruction pictures: {output_dir}/reconstruction-NNNN.png")
    if demo:
        lines.append(f"  demo data: {demo}/ (generated once, reused)")
    return "\n".join(lines)
