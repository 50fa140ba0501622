"""The outcome of a run for job scripts: the exit status, and `exit_status.json` in the run's folder.

Where: `exit_status.json` in a training run's --output_dir (main_cache.py: --cache_dir); main_predict.py writes
`<its output>.exit_status.json` beside its output file instead, never a file of the folder's own run.

Statuses: 0 done; 2 done, but some rows failed (main_predict.py, main_cache.py), or refused (a bad flag, file,
row or checkpoint: one sentence, and no status file); 75 preempted (SIGTERM/SIGUSR1) after a checkpoint was
written: rerun the same command; 130 stopped by Ctrl-C; 1 failed (a bug: its traceback).

Under torchrun the launcher's own status is 0 or 1 whatever its workers return (and 1, with its own traceback,
when it gets SIGTERM itself), and it restarts (`--max-restarts`) workers that exit with anything but 0. So rank 0
writes the real status to `exit_status.json` when a run reaches one of its planned ends (0, 2, 75, 130; after the
checkpoint of a stop is on disk), and under torchrun the workers of a run whose outputs are complete (0, 2) exit
0: torchrun reports no crash and does not run the work again. The file is removed when a run starts, so a run that
was refused or failed, or was killed, has none. Where each script writes it is its settings' `status_path`
(util.run_folder names the files).
"""
from __future__ import annotations

import json
import os
import socket
import time

from util.atomic import write_text
EXIT_PREEMPTED, EXIT_INTERRUPTED, EXIT_ROWS_FAILED = 75, 130, 2
EXIT_REFUSED = 2  # a refusal (a bad flag, file, row or checkpoint): one sentence, no status file


class Preempted(Exception):
    """Raised after the checkpoint of a stop was written; the error boundary prints `message` and exits."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


MEANINGS = {0: "done", EXIT_ROWS_FAILED: "done; some rows failed",
            EXIT_PREEMPTED: "preempted; checkpoint written; rerun the same command to resume",
            EXIT_INTERRUPTED: "stopped by Ctrl-C"}


def under_torchrun() -> bool:
    """This process is a worker started by torchrun (its agent sets TORCHELASTIC_RUN_ID)."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def clear(path: str | None) -> None:
    """Rank 0, at the start of a run: remove the status file of an earlier run (None: the script has none)."""
    if path and _rank0():
        try:
            os.remove(path)
        except OSError:
            pass


def record(path: str | None, code: int, message: str = "") -> int:
    """Rank 0 writes {'status', 'meaning', 'message', ...} to `path` for a planned end; returns the status this
    process exits with (0 instead of 2 under torchrun: the outputs are complete)."""
    if path and _rank0() and code in MEANINGS and os.path.isdir(os.path.dirname(path)):
        info = {"status": code, "meaning": MEANINGS[code], "message": message, "torchrun": under_torchrun(),
                "host": socket.gethostname(), "pid": os.getpid(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            write_text(path, json.dumps(info, indent=1) + "\n")
        except OSError:
            pass  # an unwritable folder has already been reported by the run itself
    return 0 if code == EXIT_ROWS_FAILED and under_torchrun() else code

