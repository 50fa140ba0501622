"""Scaffolding both trainers share: start-up, the locked output folder, loaders and samplers, DDP, the grad
scaler, the lr rule, resume with a recipe check, and preemption. The epochs themselves: util.train.fit."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time

import torch

from util.atomic import ensure_writable_dir, remove_stale_tmp, write_text
from util.plain import plain
from util.distributed import (all_gather_objects, get_rank, get_world_size, init_distributed, is_main_process,
                              on_main_then_share)
from util.errors import UserError
from util.nn.registry import ModelSpec
from util.train.preempt import StepControl
from util.train.run_lock import RunLock
from util.runtime import Runtime, seed_all, torch_threads
from util.data.sampler import EpochSampler
from util.run_folder import RunFolder
from util.task.record import CheckpointRecord, EpochProgress, find_resume, read_record
from util.train.loop import TrainParts
from util.train.settings import Optimization, RunOptions, TrainSettings, resolve_training
from util.volume.preprocess import PreprocessConfig

def start(run: RunOptions, optim: Optimization, epoch_line: bool = False) -> tuple[Runtime, TrainSettings]:
    """torchrun/device, threads, seeds; the TrainSettings of this runtime (util.train.settings.resolve_training)."""
    rt = init_distributed(run.device)
    torch_threads()
    train = resolve_training(optim, run, rt, epoch_line)
    seed_all(run.seed + rt.rank)
    return rt, train


class OutputDir:
    """The locked --output_dir of a run (rank 0). A run refused before it wrote anything (a bad --init, a recipe
    change, a table error) leaves no trace: the folders it created for itself are removed again when they are
    still empty once the lock is released."""

    def __init__(self, path: str):
        self.path, self.lock = os.path.abspath(path), RunLock(path)
        self.created = []  # the folders this run made, innermost first
        d = self.path
        while d and not os.path.exists(d):
            self.created.append(d)
            d = os.path.dirname(d)

    def __enter__(self) -> "OutputDir":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.lock.release()
        if exc_type is None:
            return
        for d in self.created:
            try:
                os.rmdir(d)  # only an empty folder goes
            except OSError:
                break


def open_output_dir(output_dir: str):
    """Create and lock `output_dir` (rank 0), remove temporary files of killed writes; one sentence on failure.
    Returns a context manager that releases the lock and, after a refusal, removes the folders the run created
    and left empty (a no-op on other ranks)."""
    out = OutputDir(output_dir)

    def prepare() -> None:
        ensure_writable_dir(output_dir)
        out.lock.acquire()
        remove_stale_tmp(output_dir)

    on_main_then_share(prepare)
    return out if is_main_process() else contextlib.nullcontext()


def table_fingerprint(ds) -> str:
    """'N rows sha256:HEX' of a training table as read (every row, path and label), part of the recipe: a table
    edited in place (rows added, removed or relabelled) is a data change the resume check refuses, like any
    other. A user's own dataset without `table` is fingerprinted by its `paths`."""
    table = getattr(ds, "table", None)
    text = table.to_csv(index=False) if table is not None else "\n".join(map(str, getattr(ds, "paths", [])))
    n = len(table) if table is not None else len(getattr(ds, "paths", []))
    return f"{n} rows sha256:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"


def check_readable(ds, flag: str) -> None:
    """Read every volume of an evaluation set once before training (this rank's share; through the cache, so
    nothing is wasted with --cache_dir): a broken file stops the run now, naming it, not after the first epoch.
    One line when it took more than a few seconds."""
    t0 = time.time()
    n = len(getattr(ds, "paths", []))
    for v in range(get_rank(), n, get_world_size()):
        ds.load(v)
    if time.time() - t0 > 5:
        print(f"Read the {n} volumes of {flag} once before training ({time.time() - t0:.0f}s): all readable.")


def already_complete(output_dir: str, epochs: int, start_epoch: int, progress,
                     final_file: str | None = None) -> bool:
    """True (and one line) when the resumed checkpoint already holds every epoch of this run (and `final_file`,
    the file the run writes at its very end, exists): nothing is trained, no TensorBoard file is opened."""
    if start_epoch < epochs or progress is not None or (final_file and not os.path.isfile(final_file)):
        return False
    print(f"Already complete: {output_dir} holds all {epochs} epochs of this run; nothing was trained "
          f"or written. Pass a larger --epochs to continue it, or another --output_dir for a new run.")
    return True


def train_loader(ds, train: TrainSettings, num_workers: int, what: str):
    """(sampler, loader) of a training set: seeded per epoch, sharded over ranks, resumable mid-epoch."""
    k = getattr(ds, "crops_per_volume", 1)  # a user's dataset may not have this
    per_rank = len(ds) // k // train.world_size * k
    if per_rank < train.batch_size:
        raise UserError(f"{what} has {len(ds) // k} volumes x {k} crops: fewer "
                        f"than --batch_size {train.batch_size} per process x {train.world_size} processes; lower "
                        f"--batch_size or raise --crops_per_volume.")
    if hasattr(ds, "set_transport"):  # a user's own dataset may only give float32 items (the contract)
        ds.set_transport("uint16")  # cached volumes travel as stored, scaled on the device (util.data.transport)
    sampler = EpochSampler(len(ds), train.rank, train.world_size, train.seed, group=k)
    loader = torch.utils.data.DataLoader(ds, batch_size=train.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=num_workers, pin_memory=train.device.startswith("cuda"),
                                         prefetch_factor=4 if num_workers else None,
                                         worker_init_fn=worker_init if num_workers else None)
    return sampler, loader


def worker_init(_: int) -> None:
    """Loader processes run torch single-threaded and share the cores between SimpleITK's threads. They ignore the
    stop signals a user or a scheduler sends (Ctrl-C to the terminal's group, SLURM's SIGTERM to every process),
    which the training process handles (util.train.preempt) and then shuts them down; SIGTERM from that parent (how
    the DataLoader and multiprocessing end a worker that missed its stop message) still ends them."""
    torch.set_num_threads(1)  # (the datasets share SimpleITK's threads themselves, util.data.dataset)
    try:  # the parent's wakeup pipe (util.train.preempt.Acknowledger) is for the parent's signals only
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    sigterm_from_parent_only(os.getppid())


def sigterm_from_parent_only(parent: int) -> None:
    """This process exits (status 0) on a SIGTERM sent by `parent` and ignores any other sender's.

    A worker that ignored SIGTERM altogether would outlive a loader iterator freed by the garbage collector (its
    queues are closed before the stop message goes out, so the DataLoader's last resort is terminate()) and hang
    the parent at exit, where multiprocessing terminates and then joins its daemonic children. SIGTERM is
    blocked in this thread and the threads it starts (a forked worker has no other) and taken by one of them
    with sigwaitinfo, which names the sender. Where that call
    does not exist (macOS), SIGTERM keeps its default action."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit it

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()


def wrap_ddp(model, rt: Runtime):
    if not rt.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.cuda else None)


def grad_scaler(train: TrainSettings) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda" if train.device.startswith("cuda") else "cpu",
                                enabled=train.precision == "fp16")


def step_control(run: RunOptions, train: TrainSettings) -> StepControl:
    return StepControl(train.device, run.save_every_minutes, run.save_every_steps, RunFolder(run.output_dir).last,
                       train.schedule.epochs)


def recipe_of(model: ModelSpec, train: TrainSettings, extra: dict) -> dict:
    """The values a resumed run must share with its checkpoint: the model, its sizes, the seed, the peak lr and
    the effective batch, plus the script's own (data, task, ...)."""
    return plain({"model": model.name, "input_size": model.input_size, "patch_size": model.patch_size,
                  "seed": train.seed, "lr": train.schedule.lr, "effective_batch": train.effective_batch, **extra})


def _recipe_changes(saved: CheckpointRecord, current: dict, preprocess: PreprocessConfig | None) -> list[str]:
    old = saved.recipe
    changes = [f"{k} {old[k]} -> {current[k]}" for k in current if k in old and old[k] != current[k]]
    if preprocess is not None and saved.preprocess is not None and saved.preprocess != preprocess:
        before, after = saved.preprocess.to_dict(), preprocess.to_dict()
        changes += [f"{k} {before.get(k)} -> {after.get(k)}" for k in sorted(set(before) | set(after))
                    if before.get(k) != after.get(k)]
    return changes


def load_resume(run: RunOptions, recipe: dict,
                preprocess: PreprocessConfig | None = None) -> tuple[str | None, CheckpointRecord | None]:
    """The checkpoint to resume from (--resume auto/PATH/none) after the recipe check (the recipe's values and the
    preprocessing); (None, None) for a fresh run."""
    if run.fresh:
        return None, None
    path, rec = find_resume(run.output_dir) if run.resume == "auto" else (run.resume, read_record(run.resume))
    same_resume_point(path, rec, run.output_dir)
    if path is None:
        return None, None
    changes = _recipe_changes(rec, recipe, preprocess)
    if changes and not run.allow_recipe_change:
        raise UserError(f"{path} was made with another recipe ({'; '.join(changes)}); pass --allow_recipe_change to "
                        f"continue it anyway, --resume none to start over, or choose another --output_dir.")
    if changes:
        print(f"WARNING: resuming {path} with a changed recipe: {'; '.join(changes)}.")
    trim_log(run.output_dir, rec.epoch + (0 if rec.progress else 1))
    return path, rec


def same_resume_point(path: str | None, rec: CheckpointRecord | None, output_dir: str) -> None:
    """Every rank resumes from the same point, or the run stops with one sentence: only rank 0 writes checkpoints,
    so an --output_dir that is not one shared folder (a node-local path on a cluster) would let rank 0 resume while
    the other nodes start over, and the weights would silently diverge."""
    point = None if path is None else (os.path.basename(path), rec.epoch, rec.progress.step if rec.progress else None)
    points = all_gather_objects(point)
    if any(p != points[0] for p in points):
        first = next(r for r, p in enumerate(points) if p != points[0])
        raise UserError(f"--output_dir {output_dir}: rank 0 resumes from {points[0] or 'nothing'}, rank {first} from "
                        f"{points[first] or 'nothing'}; every process must see the same folder (a shared file "
                        f"system on several nodes), or the ranks train from different weights.")


def trim_log(output_dir: str, done: int) -> None:
    """Rank 0, on resume: drop the log.txt lines of epochs after the `done` whole epochs the checkpoint holds
    (log.txt counts epochs from 1). Such a line was written before its epoch's checkpoint failed to reach the disk
    or the run was killed; the resumed run logs that epoch again, so each epoch keeps exactly one line."""
    path = RunFolder(output_dir).log
    if not is_main_process() or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    keep = [line for line in lines if (_logged_epoch(line) or 0) <= done]
    if len(keep) < len(lines):
        write_text(path, "".join(keep))
        print(f"log.txt: removed {len(lines) - len(keep)} line(s) of epochs after epoch {done}, which the "
              f"checkpoint does not hold; they are logged again.")


def _logged_epoch(line: str) -> int | None:
    try:
        epoch = json.loads(line).get("epoch")
    except (ValueError, AttributeError):
        return None
    return epoch if isinstance(epoch, int) else None


def restore(path: str, rec: CheckpointRecord, parts: TrainParts, what: str,
            epochs: int) -> tuple[int, EpochProgress | None]:
    """Load model/optimizer/scaler state; returns (epoch to run, progress inside it or None)."""
    try:
        parts.model.load_state_dict(rec.weights)
        parts.optimizer.load_state_dict(rec.optimizer)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise UserError(f"{path} does not fit {what} ({first}); use another --output_dir or --resume none.") from None
    if rec.scaler:
        parts.scaler.load_state_dict(rec.scaler)
    if rec.progress:
        print(f"Resumed from {path} (epoch {rec.epoch + 1}/{epochs}, step {rec.progress.step}).")
        return rec.epoch, rec.progress
    print(f"Resumed from {path} (after epoch {rec.epoch + 1} of {epochs}).")
    return rec.epoch + 1, None


def begin_epoch(epoch: int, sampler, dataset, progress: EpochProgress | None, batch_size: int) -> None:
    """Point the sampler (at the resume step) and the dataset's augmentation at `epoch`."""
    sampler.set_epoch(epoch, progress.step * batch_size if progress else 0)
    dataset.set_epoch(epoch)
