"""The one error boundary of the scripts: errors a user can cause end as one `error: ...` line, no traceback.

User-caused means the `UserError` family (unreadable volumes, bad tables, unusable checkpoints, bad flags; the
volume and checkpoint errors subclass it) and `OSError` (a missing file, a permission, a full disk). Anything else,
a plain `ValueError` included, is a bug and keeps its traceback. Set MAE3D_DEBUG=1 to see a traceback always.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from typing import Callable

# "util.volume.io.VolumeError: " at the start of a line re-raised from a DataLoader worker
_CLASS_PREFIX = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)\b:\s*")


class UserError(ValueError):
    """A problem with the user's input, flags or files; its message is one sentence naming what to fix.

    It stays a ValueError so that callers which catch ValueError around a reader keep working."""


def user_message(e: BaseException) -> str:
    """The one-sentence message of `e`, the same whether it was raised here or inside a DataLoader worker."""
    msg = str(e).strip()
    if "Original Traceback" in msg:  # re-raised by the DataLoader: keep the original exception's last line
        msg = msg.splitlines()[-1]
    msg = _CLASS_PREFIX.sub("", msg, count=1)
    return " ".join(msg.split()) or type(e).__name__


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that report a user-caused problem: the UserError family, and OSError (missing files,
    permissions, full disks). A plain ValueError is not one: it is a bug and keeps its traceback."""
    return (UserError, OSError)


def _ignore_ctrl_c() -> None:
    """On the way out after a stop: one more Ctrl-C would kill the exit itself (status -2, no status file)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def run_main(main: Callable, args):
    """Run a script's `main(args)` and return its exit status; user-caused errors end as one sentence on stderr
    and exit status 1; a preempted run prints where its checkpoint is and exits 75 (130 after Ctrl-C). Planned
    ends are recorded in the run's exit_status.json for job scripts (util.exit_status)."""
    from util import exit_status
    from util.exit_status import EXIT_INTERRUPTED, Preempted

    exit_status.clear(args)
    try:
        return exit_status.record(args, int(main(args) or 0))
    except Preempted as e:  # a checkpoint was written: say where, exit with the documented status
        _ignore_ctrl_c()
        print(str(e), file=sys.stderr, flush=True)
        raise SystemExit(exit_status.record(args, e.code, str(e))) from None
    except KeyboardInterrupt:
        _ignore_ctrl_c()
        if os.environ.get("MAE3D_DEBUG"):
            raise
        print("Interrupted (Ctrl-C); nothing more was written.", file=sys.stderr, flush=True)
        raise SystemExit(exit_status.record(args, EXIT_INTERRUPTED, "Interrupted (Ctrl-C).")) from None
    except SystemExit as e:  # scripts may stop with SystemExit("sentence")
        if isinstance(e.code, str):
            print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        raise
    except user_error_types() as e:
        if os.environ.get("MAE3D_DEBUG"):
            raise
        print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
