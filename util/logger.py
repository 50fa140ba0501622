"""Training logs: a progress line on rank 0, TensorBoard scalars/images, and log.txt with one JSON line per epoch."""
from __future__ import annotations

import datetime
import json
import os
import time

from util.distributed import is_main_process


class Progress:
    """Prints `epoch i/N [it/n] key value ... vol/s, eta of the epoch and of the run` every `print_freq` steps
    on rank 0 (epochs are shown counting from 1; file names and log.txt count from 0)."""

    def __init__(self, total: int, epoch: int, epochs: int, print_freq: int = 10, batch_volumes: int = 1,
                 start_step: int = 0):
        self.total, self.epoch, self.epochs, self.print_freq = total, epoch, epochs, max(1, print_freq)
        self.batch_volumes = batch_volumes
        self.start = self.last = time.time()
        self.first_it = self.last_it = start_step

    def due(self, it: int) -> bool:
        return it % self.print_freq == 0 or it == self.total - 1

    def show(self, it: int, **values) -> float:
        """Print a line; returns the volumes/s since the previous line."""
        now = time.time()
        vps = (it + 1 - self.last_it) * self.batch_volumes / max(now - self.last, 1e-9)
        self.last, self.last_it = now, it + 1
        per_step = (now - self.start) / max(it + 1 - self.first_it, 1)
        left_epoch = self.total - it - 1
        left_run = left_epoch + (self.epochs - self.epoch - 1) * self.total
        parts = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        print(f"epoch {self.epoch + 1}/{self.epochs} [{it + 1}/{self.total}] {parts} vol/s {vps:.2f} eta epoch "
              f"{_hms(per_step * left_epoch)} run {_hms(per_step * left_run)}", flush=True)
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
        with open(os.path.join(output_dir, "log.txt"), "a") as f:
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
