"""The one error boundary of the scripts: `run_main(main, settings, status_path)`.

Errors a user can cause (the `UserError` family: unreadable volumes, bad tables, unusable checkpoints, bad flags;
and `OSError`: a missing file, a permission, a full disk) end as one `error: ...` line and exit status 2, no
traceback; anything else is a bug and keeps its traceback (exit 1). MAE3D_DEBUG=1 shows a traceback always. A
planned end (done, some rows failed, preempted, Ctrl-C) is recorded in the run's status file for job scripts
(util.exit_status), which is cleared first: the path is the script's resolved settings' own, so a run whose output
folder is a default (finetuning without --output_dir) clears and writes the right file.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable, TypeVar

from util import exit_status
from util.errors import user_error_types, user_message
from util.exit_status import EXIT_INTERRUPTED, EXIT_REFUSED, Preempted

S = TypeVar("S")


def _ignore_ctrl_c() -> None:
    """On the way out after a stop: one more Ctrl-C would kill the exit itself (status -2, no status file)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def run_main(main: Callable[[S], int | None], settings: S, status_path: str | None = None) -> int:
    """Run a script's `main(settings)` and return its exit status. User-caused errors end as one sentence on stderr
    and exit status 2; a preempted run prints where its checkpoint is and exits 75 (130 after Ctrl-C). Planned ends
    are recorded in `status_path` (util.exit_status), removed when the run starts."""
    exit_status.clear(status_path)
    try:
        return exit_status.record(status_path, int(main(settings) or 0))
    except Preempted as e:  # a checkpoint was written: say where, exit with the documented status
        _ignore_ctrl_c()
        print(str(e), file=sys.stderr, flush=True)
        raise SystemExit(exit_status.record(status_path, e.code, str(e))) from None
    except KeyboardInterrupt:
        _ignore_ctrl_c()
        if os.environ.get("MAE3D_DEBUG"):
            raise
        print("Interrupted (Ctrl-C); nothing more was written.", file=sys.stderr, flush=True)
        raise SystemExit(exit_status.record(status_path, EXIT_INTERRUPTED, "Interrupted (Ctrl-C).")) from None
    except SystemExit as e:  # scripts may stop with SystemExit("sentence")
        if isinstance(e.code, str):
            print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_REFUSED) from None
        raise
    except user_error_types() as e:
        if os.environ.get("MAE3D_DEBUG"):
            raise
        print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_REFUSED) from None
