"""Preemption-safe training: SIGTERM / SIGUSR1 (what SLURM sends before it preempts a job) and SIGINT (Ctrl-C)
finish the current optimizer step, write a checkpoint that records the position inside the epoch, print one
line and exit with EXIT_PREEMPTED (75, EX_TEMPFAIL: rerun the same command) or 130 after Ctrl-C.
`--save_every_minutes` / `--save_every_steps` write the same mid-epoch checkpoint periodically.

All ranks must stop and save at the same step. Decisions that depend on a clock or on a signal are therefore
combined across ranks with one tiny all-reduce per optimizer step, on a CPU (gloo) group so that no GPU stream
is involved, started asynchronously and read one step later so the ranks never wait for each other; one
process decides from Python values alone. The saving schedule by steps is the same on every rank without
communication.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from util.distributed import is_dist, is_main_process
from util.run_folder import LAST
from util.exit_status import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted, under_torchrun  # noqa: F401 - re-exported

SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGUSR1": signal.SIGUSR1, "SIGINT": signal.SIGINT}
AGENT_GONE = "agent-gone"  # StepControl.signal when the torchrun agent died (a signal it does not forward)


class StepControl:
    """Decides, at optimizer-step boundaries, when to write a mid-epoch checkpoint and when to stop."""

    def __init__(self, device: str, save_every_minutes: float = 0.0, save_every_steps: int = 0,
                 checkpoint_path: str = LAST, epochs: int = 0) -> None:
        self.device, self.minutes, self.steps, self.epochs = device, save_every_minutes, save_every_steps, epochs
        self.checkpoint_path = checkpoint_path
        self.signal: str | None = None
        self.last_save = time.monotonic()
        self._pending: tuple | None = None  # (async work, flags) of the previous optimizer step
        self._void_due = False              # a save happened since the pending flags were raised
        self._group = None
        if is_dist() and dist.get_backend() != "gloo":  # host flags on a CPU group (NCCL takes only GPU tensors)
            self._group = dist.new_group(backend="gloo")
        self._old = {}
        for name, sig in SIGNALS.items():
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): signals stay as they were
                pass
        self._ack = Acknowledger() if self._old else None
        self._agent = os.getppid() if under_torchrun() else None  # the torchrun agent (see _check_agent)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: leave now, without a checkpoint
        if self.signal is None:
            self.signal = name
            if self._ack is None or not self._ack.active:  # else its thread has said it already
                print(ack_line(name), flush=True)

    def _check_agent(self) -> None:
        """Under torchrun: the agent that started this worker is gone (this process has another parent now). A
        signal the agent does not forward kills it (SIGUSR1, which SLURM sends before preemption, unless torchrun
        runs with --signals_to_handle ...,SIGUSR1), and its workers would train on with nobody waiting for them:
        stop at the next step with a checkpoint, like a preemption."""
        if self.signal is None and self._agent is not None and os.getppid() != self._agent:
            self.signal = AGENT_GONE
            print(f"The torchrun agent (pid {self._agent}) is gone: the run stops after the current step and "
                  f"writes a checkpoint.", flush=True)

    def _local_flags(self) -> tuple[bool, bool]:
        """(a signal arrived, a timed save is due): the timer runs on rank 0, whose decision all ranks follow."""
        self._check_agent()
        due = bool(self.minutes) and is_main_process() and time.monotonic() - self.last_save >= 60 * self.minutes
        return self.signal is not None, due

    def decide(self, steps_done: int) -> tuple[bool, bool]:
        """(save, stop) after `steps_done` micro-steps of this epoch; identical on every rank."""
        by_steps = bool(self.steps) and steps_done % self.steps == 0
        if not is_dist():
            stop, due = self._local_flags()
            return by_steps or due or stop, stop
        flags = torch.tensor(self._local_flags(), dtype=torch.float32)
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        previous, self._pending = self._pending, (work, flags)
        if previous is None:
            return by_steps, False
        previous[0].wait()
        stop, due = (bool(v) for v in previous[1].tolist())
        due, self._void_due = due and not self._void_due, False
        return by_steps or due or stop, stop

    def saved(self) -> None:
        """A checkpoint was written: the timer restarts, and a timed save already in flight is dropped."""
        self.last_save = time.monotonic()
        self._void_due = True

    def _drain(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def stop_requested(self) -> bool:
        """A stop agreed by every rank (a collective in distributed runs: call it on all ranks)."""
        self._check_agent()
        if not is_dist():
            return self.signal is not None
        self._drain()  # the last step's flags: a signal they carry is also in this one
        flag = torch.tensor([float(self.signal is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def stop(self, epoch: int, steps_done: int | None) -> None:
        """Raise Preempted with the one line to print."""
        name = self.signal or "SIGTERM"
        where = (f"epoch {epoch + 1}/{self.epochs}, step {steps_done}" if steps_done
                 else f"the end of epoch {epoch + 1}/{self.epochs}")
        what = {"SIGINT": "Ctrl-C", AGENT_GONE: "the exit of the torchrun agent"}.get(name, name)
        raise Preempted(f"Stopped by {what} at {where}; checkpoint written to "
                        f"{self.checkpoint_path}; rerun the same command to resume.",
                        EXIT_INTERRUPTED if name == "SIGINT" else EXIT_PREEMPTED)

    def close(self) -> None:
        """Finish the collective in flight; restore the previous signal handlers."""
        if is_dist():
            self._drain()
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        if self._ack is not None:
            self._ack.close()
            self._ack = None


def ack_line(name: str) -> str:
    what = "Ctrl-C" if name == "SIGINT" else name
    return (f"{what} received: the run stops after the current step and writes a checkpoint"
            + (" (Ctrl-C again to quit without one)." if name == "SIGINT" else "."))


class Acknowledger:
    """Says at once that a stop signal arrived. Python runs a signal handler only between bytecodes of the main
    thread, so during one long native call (a 25 s step of a large model) the handler, and any line it prints,
    waits for the call to end. The C-level handler also writes the signal's number to a pipe
    (`signal.set_wakeup_fd`); a thread blocked on that pipe wakes up at once and prints the line (the main
    thread's handler only sets the flag: nothing is printed from inside a signal handler). `active` is False
    where no wakeup pipe could be set (then the handler prints, as before)."""

    def __init__(self) -> None:
        self.active, self._said = False, set()
        self._lock = threading.Lock()
        try:
            self._r, self._w = os.pipe()
            os.set_blocking(self._w, False)
            self._previous = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        except (ValueError, OSError):  # not the main thread
            return
        self.active = True
        threading.Thread(target=self._listen, name="stop-signal-ack", daemon=True).start()

    def _listen(self) -> None:
        stops = {int(sig) for sig in SIGNALS.values()}
        while True:
            try:
                data = os.read(self._r, 64)
            except OSError:
                return
            if not data:  # the write end was closed: the run is over
                os.close(self._r)
                return
            for signum in data:  # other signals with Python handlers (SIGCHLD of loader workers) pass by
                if signum in stops:
                    self._say(signal.Signals(signum).name)

    def _say(self, name: str) -> None:
        with self._lock:
            if self._said:  # the first stop signal is announced; a second Ctrl-C is the handler's business
                return
            self._said.add(name)
        print(ack_line(name), flush=True)

    def close(self) -> None:
        if not self.active:
            return
        try:
            signal.set_wakeup_fd(self._previous)
        except ValueError:
            pass
        os.close(self._w)
        self.active = False
