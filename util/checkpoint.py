"""Checkpoint I/O: atomic checksummed writes, the one safe (weights_only) and verified reader, weights in any
container, resume discovery.

Readable: our checkpoints, TANGERINE / upstream files ({'model': ...}, {'state_dict': ...}, {'model_state': ...}
or a raw state dict, `module.` / `_orig_mod.` prefixes, encoder-only or with the decoder) and the original
project's training dicts whose 'args' is an argparse.Namespace. Everything loads with weights_only=True; the only
classes allowed beyond plain data are argparse.Namespace and pathlib paths, which build data and run no code.
Every file is checked against its checksums before it is unpickled (util/checkpoint_verify.py): ours carry a CRC32
of the whole file, a zip from elsewhere is checked record by record.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import pathlib
import pickle
import re
import signal
import threading
import zipfile
from pathlib import Path

import torch

from util.atomic import atomic_write
from util.checkpoint_verify import ChecksummedFile, CorruptCheckpointError, verify
from util.checkpoint_verify import DamagedCheckpointError  # noqa: F401 - raised by load_checkpoint, caught by callers
from util.errors import UserError
from util.finite import first_non_finite
from util.faults import fault_point
from util.run_folder import RunFolder

SAFE_CLASSES = (argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                pathlib.PureWindowsPath)
PREFIXES = ("module.", "_orig_mod.")


class UnsafeCheckpointError(UserError):
    """The file needs a Python class that could run code to load; it is refused."""


class NonFiniteCheckpointError(CorruptCheckpointError):
    """A floating tensor of the file holds NaN or Inf: every output computed from it would be wrong."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """The checkpoint path does not exist (an OSError too, for callers that catch those)."""


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """torch.save to `path` via a temporary file in the same folder, fsync, then rename; the file ends with the
    CRC32 of its bytes (util/checkpoint_verify.py), computed as they are written.

    A crash or a full disk leaves the previous file at `path` untouched.
    """
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            checksummed = ChecksummedFile(f)
            torch.save(obj, checksummed)
            checksummed.add_comment()
            f.flush()
            fault_point(f"save_mid:{path.name}")

    try:
        atomic_write(path, write, fsync=True)
    except (OSError, RuntimeError) as e:
        os_err = _os_error_in_chain(e)  # torch.save reports a failed write as a RuntimeError
        if os_err is None:
            raise
        raise OSError(os_err.errno, f"Could not write checkpoint {path}: {os_err.strerror or os_err}; "
                                    f"the previous checkpoint there (if any) is intact.") from e


def snapshot(obj, reuse=None):
    """A copy of a state (nested dicts/lists of tensors) on the CPU that training can no longer change.

    `reuse` (an earlier snapshot of the same state) lends its tensors as destinations when shapes and dtypes
    match, so repeated checkpoints copy into memory that is already mapped (pinned for GPU tensors) instead of
    faulting in gigabytes of new pages each time.
    """
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        if isinstance(reuse, torch.Tensor) and reuse.shape == src.shape and reuse.dtype == src.dtype:
            return reuse.copy_(src)
        out = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
        return out.copy_(src)
    if isinstance(obj, dict):
        reuse = reuse if isinstance(reuse, dict) else {}
        return {k: snapshot(v, reuse.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        reuse = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(obj) else [None] * len(obj)
        return type(obj)(snapshot(v, r) for v, r in zip(obj, reuse))
    return copy.deepcopy(obj)


class CheckpointWriter:
    """Writes checkpoints in a background thread, so training resumes as soon as the state is copied to the CPU.

    One write at a time: `save` first waits for the previous write and re-raises its error (e.g. a full disk),
    so a failed write stops the run at the next checkpoint at the latest; `wait()` before exiting.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last: dict | None = None  # the previous snapshot: its tensors are reused as copy destinations
        self._done = threading.Event()  # set when the pending write has ended

    def save(self, state: dict, paths: list, background: bool = True) -> None:
        """Copy `state` to the CPU, then write it to every path in `paths` (in order), in the background
        (background=False: wait for it). The write always runs in the writer thread: a Ctrl-C can stop the
        wait, never cut torch.save in the middle; `wait(ctrl_c=False)` then lets it finish."""
        self.wait()
        state = self._last = snapshot(state, self._last)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._write, args=(state, paths, self._done), name="checkpoint-writer")
        self._thread.start()
        if not background:
            self.wait()

    def _write(self, state: dict, paths: list, done: threading.Event) -> None:
        try:
            for path in paths:
                save_atomic(state, path)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e
        finally:
            done.set()

    def wait(self, ctrl_c: bool = True) -> None:
        """Block until the pending write is on disk; raise its error if it failed. ctrl_c=False: Ctrl-C is
        ignored meanwhile (on the way out after an interrupt: a write cut at interpreter exit can abort it)."""
        if self._thread is not None:
            # wait on the event, not in join(): a Ctrl-C that interrupts Thread.join() marks the thread as
            # stopped (CPython bpo-45274), so nothing would wait for the write any more and the interpreter
            # could exit with torch.save half done
            with contextlib.nullcontext() if ctrl_c else _ctrl_c_ignored():
                self._done.wait()
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


@contextlib.contextmanager
def _ctrl_c_ignored():
    """SIGINT is ignored inside (when called from the main thread; elsewhere signals are not ours to set)."""
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def _os_error_in_chain(e: BaseException) -> OSError | None:
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True after checking its checksums; what its keys mean is read by
    util.task.record.CheckpointRecord. Refuses with one sentence: a file whose checksum or zip structure shows damage
    (naming the record), files that need code to load (naming the class), and files whose floating tensors hold NaN
    or Inf (naming the first key; find_resume skips those like a corrupt file)."""
    path = str(path)
    if os.path.isdir(path):  # a model folder (main_export.py): the same dict, from safetensors (util.model_folder)
        from util.model_folder import as_checkpoint
        return as_checkpoint(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"Checkpoint {path} does not exist.")
    ckpt, kind = _load_verified(path, map_location)
    if kind == "not a zip":
        print(f"WARNING: Checkpoint {path} is in torch's legacy (non-zip) format, which carries no checksum: damage "
              f"inside it cannot be detected.")
    elif kind == "zip without CRCs":
        print(f"WARNING: Checkpoint {path} was saved without CRC32s (torch.serialization.config.save.compute_crc32="
              f"False): its zip structure was checked, its data cannot be.")
    if not isinstance(ckpt, dict):
        raise CorruptCheckpointError(f"Checkpoint {path} holds a {type(ckpt).__name__}, expected a dict.")
    bad = first_non_finite(ckpt)
    if bad is not None:
        raise NonFiniteCheckpointError(f"Checkpoint {path} holds NaN or infinite values in {bad!r}; every output "
                                       f"computed from it would be wrong (the run that wrote it diverged, or the "
                                       f"file is damaged), so it is refused.")
    return ckpt


def _load_verified(path: str, map_location) -> tuple[object, str]:
    """torch.load(path) of the very file whose checksums were checked (a run may replace it meanwhile: atomic
    renames give the path a new inode, so the load is retried on the new file); and verify()'s kind of file."""
    for _ in range(3):
        with open(path, "rb") as f:
            kind = verify(f, path)
            try:
                ckpt = _torch_load(path, map_location)
            except CorruptCheckpointError:
                if _same_file(os.fstat(f.fileno()), path):
                    raise
                continue
            if _same_file(os.fstat(f.fileno()), path):
                return ckpt, kind
    raise CorruptCheckpointError(f"Checkpoint {path} was replaced three times while being read; try again.")


def _same_file(st: os.stat_result, path: str) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _torch_load(path: str, map_location):
    try:
        with torch.serialization.safe_globals(list(SAFE_CLASSES)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found or "Unsupported global" in str(e):
            cls = found.group(1) if found else "a Python object"
            raise UnsafeCheckpointError(
                f"Checkpoint {path} needs {cls} to load, which could run arbitrary code (unsafe pickle); it was "
                f"refused. Re-save its tensors as plain data: torch.save({{'model': model.state_dict()}}, path).") \
                from None
        raise CorruptCheckpointError(f"Checkpoint {path} is corrupt or not a torch checkpoint ({e}).") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as e:
        raise CorruptCheckpointError(
            f"Checkpoint {path} is truncated, corrupt or not a torch checkpoint ({type(e).__name__}).") from None


def strip_prefixes(sd: dict) -> dict:
    """State dict keys without DDP / torch.compile prefixes (`module.`, `_orig_mod.`, also inside the key)."""
    out = {}
    for k, v in sd.items():
        while k.startswith(PREFIXES):
            k = k.split(".", 1)[1]
        out[k.replace("._orig_mod.", ".")] = v
    return out


def best_or_last(folder: str | os.PathLike) -> str | None:
    """checkpoint-best.pth in `folder`, else checkpoint-last.pth, else None."""
    return RunFolder(str(folder)).best_or_last()
