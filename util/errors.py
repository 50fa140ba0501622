"""Errors a user can cause, and their one-sentence messages (util.cli.run_main is the boundary that prints them).

User-caused means the `UserError` family (unreadable volumes, bad tables, unusable checkpoints, bad flags; the
volume and checkpoint errors subclass it) and `OSError` (a missing file, a permission, a full disk). Anything else,
a plain `ValueError` included, is a bug and keeps its traceback. Set MAE3D_DEBUG=1 to see a traceback always.
"""
from __future__ import annotations

import re

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
