"""Checkpoint I/O: atomic writes, safe (weights_only) loading, resume discovery with fallback."""
from __future__ import annotations

import glob
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from util.faults import fault_point


class UnsafeCheckpointError(ValueError):
    """The file needs arbitrary pickled code to load; it is refused."""


class CorruptCheckpointError(ValueError):
    """The file is truncated or is not a torch checkpoint."""


def plain(obj):
    """Convert argparse values (tuples, Paths, numpy scalars) to plain JSON-like Python types."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """torch.save to `path` via a temporary file in the same folder, fsync, then rename.

    A crash or a full disk leaves the previous file at `path` untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            fault_point(f"save_mid:{path.name}")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        os_err = _os_error_in_chain(e)  # torch.save reports a failed write as a RuntimeError
        if os_err is None:
            raise
        raise OSError(os_err.errno, f"Could not write checkpoint {path}: {os_err.strerror or os_err}; "
                                    f"the previous checkpoint there (if any) is intact.") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


def _os_error_in_chain(e: BaseException) -> OSError | None:
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True; refuse pickles that would run code, with a clear error."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "GLOBAL " in msg:
            raise UnsafeCheckpointError(
                f"Checkpoint {path} needs arbitrary Python code to load (unsafe pickle); it was refused. "
                f"Re-save it as a plain state dict: torch.save({{'model': model.state_dict()}}, path).") from None
        raise CorruptCheckpointError(f"Checkpoint {path} is corrupt or not a torch checkpoint ({e}).") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as e:
        raise CorruptCheckpointError(
            f"Checkpoint {path} is truncated, corrupt or not a torch checkpoint ({type(e).__name__}).") from None
    if not isinstance(ckpt, dict):
        raise CorruptCheckpointError(f"Checkpoint {path} holds a {type(ckpt).__name__}, expected a dict.")
    return ckpt


def clean_state_dict(sd: dict) -> dict:
    """Return the model state dict from a checkpoint, stripping DDP/compile prefixes."""
    if "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        k = k.replace("._orig_mod.", ".")
        out[k] = v
    return out


def _epoch_of(p: str) -> int:
    m = re.search(r"checkpoint-(\d+)\.pth$", p)
    return int(m.group(1)) if m else -1


def find_resume(output_dir: str | os.PathLike) -> tuple[str | None, dict | None]:
    """The newest loadable checkpoint in `output_dir`: checkpoint-last.pth, else the newest numbered one.

    A corrupt file is skipped with a warning; an unsafe one raises (it was not written by us).
    """
    last = os.path.join(output_dir, "checkpoint-last.pth")
    numbered = sorted(glob.glob(os.path.join(output_dir, "checkpoint-[0-9]*.pth")), key=_epoch_of, reverse=True)
    candidates = ([last] if os.path.isfile(last) else []) + numbered
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
        except CorruptCheckpointError as e:
            print(f"WARNING: {e} Trying an older checkpoint.")
            continue
        if "epoch" in ckpt and "model" in ckpt:
            # checkpoint-last may be older than a numbered one if a run was moved; take the newest epoch
            return path, ckpt
    return None, None


def remove_stale_tmp(output_dir: str | os.PathLike) -> None:
    """Delete temporary files left by a process killed while writing a checkpoint."""
    for p in glob.glob(os.path.join(output_dir, ".*.tmp[0-9]*")):
        try:
            os.remove(p)
        except OSError:
            pass
