"""Preemption-safe training: SIGTERM / SIGUSR1 (what SLURM sends before it preempts a job) and SIGINT (Ctrl-C)
finish the current optimizer step, write a checkpoint that records the position inside the epoch, print one
line and exit with EXIT_PREEMPTED (75, EX_TEMPFAIL: rerun the same command) or 130 after Ctrl-C.
`--save_every_minutes` / `--save_every_steps` write the same mid-epoch checkpoint periodically.

All ranks must stop and save at the same step. Decisions that depend on a clock or on a signal are therefore
combined across ranks with one tiny all-reduce per optimizer step, read back one step later so the host never
waits for the GPU; the saving schedule by steps is the same on every rank without communication.
"""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from util.distributed import is_dist, is_main_process

EXIT_PREEMPTED, EXIT_INTERRUPTED = 75, 130
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGUSR1": signal.SIGUSR1, "SIGINT": signal.SIGINT}


class Preempted(Exception):
    """Raised after the checkpoint of a stop was written; the error boundary prints `message` and exits."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class StepControl:
    """Decides, at optimizer-step boundaries, when to write a mid-epoch checkpoint and when to stop."""

    def __init__(self, device: str, save_every_minutes: float = 0.0, save_every_steps: int = 0,
                 checkpoint_path: str = "checkpoint-last.pth", epochs: int = 0) -> None:
        self.device, self.minutes, self.steps, self.epochs = device, save_every_minutes, save_every_steps, epochs
        self.checkpoint_path = checkpoint_path
        self.signal: str | None = None
        self.last_save = time.monotonic()
        self._pending: torch.Tensor | None = None
        self._old = {}
        for name, sig in SIGNALS.items():
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): signals stay as they were
                pass

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: leave now, without a checkpoint
        if self.signal is None:
            self.signal = name
            what = "Ctrl-C" if name == "SIGINT" else name
            print(f"{what} received: finishing this step, then writing a checkpoint"
                  + (" (Ctrl-C again to quit without one)." if name == "SIGINT" else "."), flush=True)

    def _local_flags(self) -> torch.Tensor:
        due = bool(self.minutes) and is_main_process() and time.monotonic() - self.last_save >= 60 * self.minutes
        return torch.tensor([float(self.signal is not None), float(due)], device=self.device)

    def decide(self, steps_done: int) -> tuple[bool, bool]:
        """(save, stop) after `steps_done` micro-steps of this epoch; identical on every rank."""
        by_steps = bool(self.steps) and steps_done % self.steps == 0
        if not is_dist():
            stop, due = self._local_flags().tolist()
            return bool(by_steps or due or stop), bool(stop)
        flags = self._local_flags()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        previous, self._pending = self._pending, flags
        if previous is None:
            return by_steps, False
        stop, due = previous.tolist()
        if stop:
            self._pending = None
        return bool(by_steps or due or stop), bool(stop)

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def stop_requested(self) -> bool:
        """A stop agreed by every rank (a collective in distributed runs: call it on all ranks)."""
        flag = torch.tensor([float(self.signal is not None)], device=self.device)
        if is_dist():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self, epoch: int, steps_done: int | None) -> None:
        """Raise Preempted with the one line to print."""
        name = self.signal or "SIGTERM"
        where = (f"epoch {epoch + 1}/{self.epochs}, step {steps_done}" if steps_done
                 else f"the end of epoch {epoch + 1}/{self.epochs}")
        raise Preempted(f"Stopped by {'Ctrl-C' if name == 'SIGINT' else name} at {where}; checkpoint written to "
                        f"{self.checkpoint_path}; rerun the same command to resume.",
                        EXIT_INTERRUPTED if name == "SIGINT" else EXIT_PREEMPTED)

    def close(self) -> None:
        """Restore the previous signal handlers."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
