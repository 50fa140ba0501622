"""One run per output folder: an exclusive lock on `<output_dir>/.run.lock`, held for the whole run.

flock(2) locks belong to the open file and vanish with the process that holds them, so a run that died (kill -9,
OOM, a torchrun restart) never blocks the next one. Network file systems: NFS (v3 with lockd, v4) maps flock to
POSIX locks, which work across machines; Lustre needs the `flock` mount option. Where the file system refuses
locks the run goes on with a warning.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

from util.errors import UserError

LOCK_NAME = ".run.lock"


class RunLock:
    """Hold the lock of `folder` from `acquire()` to `release()` (or the end of the process)."""

    def __init__(self, folder: str) -> None:
        self.folder, self.path, self.fd = os.path.abspath(folder), os.path.join(folder, LOCK_NAME), None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise UserError naming the folder and the process that holds it."""
        os.makedirs(self.folder, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                return self._refused(fd, e)
            try:  # the holder we waited for may have removed the file: lock the one that is there now
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def _refused(self, fd: int, e: OSError) -> "RunLock":
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"{self.folder} is in use by another run ({holder}); wait for it to finish, stop "
                            f"it, or choose another --output_dir.") from None
        print(f"WARNING: {self.folder}: this file system does not support locks ({e.strerror}); nothing "
              f"prevents a second run from writing into this folder.", flush=True)
        os.close(fd)
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock (a run that dies without this leaves an unlocked file)."""
        if self.fd is not None:
            try:
                os.remove(self.path)
            except OSError:
                pass
            os.close(self.fd)  # closing the file releases the lock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "process unknown"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: {info.get('command')}"
