"""Distributed set-up for torchrun (one process per GPU, or CPU processes with gloo) and small collectives."""
from __future__ import annotations

import datetime
import os
import time
import uuid

import torch
import torch.distributed as dist

from util.errors import UserError, user_error_types
from util.runtime import Runtime


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def init_distributed(device: str | None = None) -> Runtime:
    """The Runtime of this process, with the process group joined under torchrun.

    `device`: 'cuda', 'cpu' or None (cuda when available). Without torchrun variables this is one process. Under
    torchrun the backend is NCCL when CUDA is used and gloo on CPU.
    """
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: running on CPU.")
        want = "cpu"
    rank, world, local = 0, 1, 0
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
    if want.startswith("cuda"):
        torch.cuda.set_device(local)
        want = f"cuda:{local}"
    else:
        want = "cpu"
    rt = Runtime(rank, world, local, want)
    if rt.distributed:
        backend = "nccl" if rt.cuda else "gloo"
        dist.init_process_group(backend=backend, store=_round_store(rank, world), rank=rank, world_size=world,
                                timeout=_TIMEOUT, device_id=torch.device(want) if backend == "nccl" else None)
        dist.barrier()
    _quiet_non_main()
    return rt


_TIMEOUT = datetime.timedelta(minutes=30)


def _round_store(rank: int, world_size: int) -> dist.Store:
    """The rendezvous store of this start of the workers, under a name of their own.

    After torchrun restarts the workers (`--max-restarts`), its agent's store (TORCHELASTIC_USE_AGENT_STORE, the
    c10d rendezvous's default) still holds the dead workers' addresses: the new process group must use new keys.
    torchrun's restart count cannot name them: each agent counts its own restarts, so after one machine's worker
    died that machine counts 1 and the others, which restart theirs for the membership change, 0; workers named by
    it would wait for each other under different names for 30 minutes. Rank 0 names the group instead.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_store, timeout=_TIMEOUT)
    name = _group_name(dist.PrefixStore("mae3d_start", store), rank, world_size) if agent_store else "new"
    return dist.PrefixStore(f"mae3d_group_{name}", store)


def _group_name(store: dist.Store, rank: int, world_size: int) -> str:
    """A random name drawn by rank 0 and learnt by every rank; no earlier start of the workers used it.

    Keys the dead workers left look current, so each rank asks a random question of its own (`ask/R`) and reads
    only the answer filed under that question; rank 0 answers each rank's latest question until that rank has filed
    a receipt under the new name. Neither of those keys can come from an earlier start."""
    if rank != 0:
        question = uuid.uuid4().hex
        store.set(f"ask/{rank}", question)
        name = store.get(f"answer/{question}").decode()  # waits at most the store's timeout
        store.set(f"got/{name}/{rank}", "1")
        return name
    name, answered, waiting = uuid.uuid4().hex, {}, list(range(1, world_size))
    deadline = time.monotonic() + _TIMEOUT.total_seconds()
    while waiting:
        for r in waiting:
            question = store.get(f"ask/{r}") if store.check([f"ask/{r}"]) else None
            if question is not None and answered.get(r) != question:
                store.set(f"answer/{question.decode()}", name)
                answered[r] = question
        waiting = [r for r in waiting if not store.check([f"got/{name}/{r}"])]
        if waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ranks {waiting} did not reach rank 0 within {_TIMEOUT} of its start.")
            time.sleep(0.02)
    return name


def _quiet_non_main() -> None:
    """Only rank 0 prints, unless a call passes force=True."""
    import builtins

    if getattr(builtins.print, "_mae3d_wrapped", False):
        return
    builtin_print = builtins.print

    def print_(*a, **kw):
        force = kw.pop("force", False)
        if is_main_process() or force:
            builtin_print(*a, **kw)

    print_._mae3d_wrapped = True
    builtins.print = print_


def cleanup() -> None:
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(x: float | torch.Tensor, device: str | torch.device = "cpu") -> float:
    """Mean of a scalar across ranks (one collective; call only outside the per-step hot path)."""
    t = torch.as_tensor(x, dtype=torch.float64, device=device).detach().clone()
    if is_dist():
        dist.all_reduce(t)
        t /= get_world_size()
    return float(t)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across ranks (returns a new tensor)."""
    t = t.detach().clone()
    if is_dist():
        dist.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` [n_rank, ...] from every rank along dim 0, in rank order; lengths may differ per rank."""
    if not is_dist():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = max(sizes) - t.shape[0]
    if pad:
        t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
    out = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(out, t.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def all_gather_objects(obj) -> list:
    """Gather a picklable Python object from every rank (small metadata only)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main_then_share(fn):
    """Run `fn()` on rank 0 only; if it raises, every rank raises the same kind of error with the same message
    (so all processes of a torchrun job stop with one sentence instead of hanging at the next collective)."""
    err = None
    if is_main_process():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - shared with the other ranks (they would hang), re-raised below
            err = e
    failed = all_gather_objects(None if err is None else (isinstance(err, user_error_types()), str(err)))[0]
    if err is not None:
        raise err
    if failed is not None:  # rank 0's one sentence, or (a bug there, whose traceback rank 0 prints) a plain error
        user, msg = failed
        raise UserError(msg) if user else RuntimeError(f"rank 0 failed: {msg}")
