"""Training logs: a progress line on rank 0, TensorBoard scalars/images, and log.txt with one JSON line per epoch."""
from __future__ import annotations

import datetime
import json
import os
import time

from util.distributed import is_main_process


class Progress:
    """Prints `header [it/n] key=value ... vol/s eta` every `print_freq` steps on rank 0."""

    def __init__(self, total: int, header: str, print_freq: int = 10, batch_volumes: int = 1):
        self.total, self.header, self.print_freq = total, header, max(1, print_freq)
        self.batch_volumes = batch_volumes
        self.start = self.last = time.time()
        self.last_it = 0

    def due(self, it: int) -> bool:
        return it % self.print_freq == 0 or it == self.total - 1

    def show(self, it: int, **values) -> float:
        """Print a line; returns the volumes/s since the previous line."""
        now = time.time()
        vps = (it + 1 - self.last_it) * self.batch_volumes / max(now - self.last, 1e-9)
        self.last, self.last_it = now, it + 1
        done = it + 1
        eta = (now - self.start) / done * (self.total - done)
        parts = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        print(f"{self.header} [{done}/{self.total}] {parts} vol/s {vps:.2f} "
              f"eta {datetime.timedelta(seconds=int(eta))}", flush=True)
        return vps


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
