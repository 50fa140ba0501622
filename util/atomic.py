"""Atomic file writes: write to a temporary name in the destination folder, then rename it into place.

A killed process, a full disk or an exception never leaves a half-written file under the final name; the
previous file there, if any, stays intact. Temporary names are `.tmp-<random>-<name>` (so the extension, which
SimpleITK and pandas look at, is kept) and `remove_stale_tmp` deletes the ones a killed writer left behind.
"""
from __future__ import annotations

import glob
import os
import tempfile
from typing import Callable

from util.errors import UserError

TMP_PREFIX = ".tmp-"


def tmp_path_for(path: str | os.PathLike) -> str:
    """A new, unique temporary file next to `path` (created empty, mode 0644)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=f"-{name}")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; shared caches and run folders are read by others
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], fsync: bool = False) -> str:
    """Call `write(tmp)` to fill a temporary file, then rename it to `path`; returns `path`.

    fsync=True makes the data and the rename durable before returning (checkpoints). Parent folders are
    created. On any failure the temporary file is removed and the exception propagates.
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    if fsync:
        _fsync_folder(os.path.dirname(path))
    return path


def write_text(path: str | os.PathLike, text: str) -> str:
    """Atomically replace `path` with `text` (UTF-8)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def remove_stale_tmp(folder: str | os.PathLike, recursive: bool = False, older_than: float | None = None) -> int:
    """Delete temporary files a killed writer left in `folder` (and its subfolders when `recursive`); with
    `older_than` (a time.time() stamp) only those last modified before it, so live writers elsewhere keep theirs.
    Without it, call only where no other writer runs. Returns how many were removed."""
    pattern = os.path.join(os.fspath(folder), "**", TMP_PREFIX + "*") if recursive else \
        os.path.join(os.fspath(folder), TMP_PREFIX + "*")
    n = 0
    for p in glob.glob(pattern, recursive=recursive):
        try:
            if older_than is None or os.stat(p).st_mtime < older_than:
                os.remove(p)
                n += 1
        except OSError:
            pass
    return n


def ensure_writable_dir(path: str | os.PathLike, what: str = "--output_dir") -> None:
    """Create `path` or fail with one sentence if it cannot be written. The probe file has a name of its own (every
    rank of a job checks the same folders at once; a shared name let one rank delete another's probe)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test-") as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as e:
        raise UserError(f"{what} {path} is not a writable folder ({e.strerror or e}).") from None
