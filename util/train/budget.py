"""What a training run will cost, said before its first step: peak memory per step (model and optimizer state,
activations, the loader's prefetched batches) and, on CPU, the expected seconds per step; a run that cannot fit
in the memory this machine has is refused with one sentence naming the flags to change.

The model is described by `Workload` (its trainable and frozen parameters and the transformer blocks that run,
each as tokens x width), which the scripts fill from a model built on the meta device (no memory, a fraction of
a second). The constants below were fitted to the peak memory (PSS of the whole process tree) of real
`main_pretrain.py` / `main_finetune.py` runs on CPU (bench/bench_memory_estimate.py; README, Pretraining).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from util.errors import UserError
from util.train.settings import RunOptions, TrainSettings

GiB = 2 ** 30
# Saved for backward by one transformer block, per token, in units of the block's width: the residual input,
# both LayerNorm outputs, q, k, v and the attention output, the projection input, the MLP's 4x hidden before and
# after GELU, and the attention's softmax statistics: about 18 (fp32); half of them in 16 bits under autocast.
ACT_PER_TOKEN_WIDTH = 18
# A block's transient working set in backward (gradients of its activations), also what a checkpointed block
# recomputes: counted once on top of what the blocks keep.
TRANSIENT_BLOCKS = 2
# Copies of a batch of volumes alive in a step: the batch, its patches, the targets, the prediction and its
# gradient (pretraining); the batch and its patch embedding input (finetuning).
INPUT_COPIES = 5
STATE_BYTES = {"adamw": 16, "lars": 12, "frozen": 4}  # per parameter: weights, gradient, optimizer moments
# What a step spends outside the FLOPs counted (optimizer update, patchify, loss, copies): fitted on CPU, where the
# counted part alone came to 0.81-0.89 of the measured step (bench/bench_memory_estimate.py)
STEP_OVERHEAD = 1.18


@dataclass
class Workload:
    """What one training step of a model runs. `blocks`: (tokens per sample, width, trainable) per transformer
    block; a frozen block (linear probe) keeps no activations."""
    trainable: int
    frozen: int = 0
    blocks: list[tuple[int, int, bool]] = field(default_factory=list)
    voxels: int = 0              # per sample, per channel
    dense_maps: int = 0          # segmentation decoder: full-resolution feature maps per sample (channels)
    optimizer: str = "adamw"
    head_flops: float = 0.0      # forward FLOPs per sample outside the blocks (patch embedding, prediction head)


@dataclass
class Estimate:
    """Bytes per step of one process, by part; `seconds` per step on CPU (None elsewhere)."""
    state: float
    activations: float
    inputs: float
    loader: float
    checkpoint_copy: float
    seconds: float | None = None
    rate: float | None = None    # the FLOP/s the step's blocks reach (measured by block_rate)

    @property
    def total(self) -> float:
        return self.state + self.activations + self.inputs + self.loader + self.checkpoint_copy

    def parts(self) -> str:
        return (f"model and optimizer state {self.state / GiB:.2f}, activations {self.activations / GiB:.2f}, "
                f"batch tensors {self.inputs / GiB:.2f}, loader prefetch {self.loader / GiB:.2f}, checkpoint copy "
                f"{self.checkpoint_copy / GiB:.2f} GiB")


def workload_of(model: torch.nn.Module, blocks: list[tuple[int, int, bool]], voxels: int, dense_maps: int = 0,
                optimizer: str = "adamw", head_flops: float = 0.0) -> Workload:
    """A Workload from a model (meta device is enough: only shapes are read)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return Workload(trainable, frozen, blocks, voxels, dense_maps, optimizer, head_flops)


def estimate(w: Workload, batch: int, precision: str, grad_checkpointing: bool, device: str, num_workers: int,
             prefetch: int = 4, item_bytes: int = 2, distributed: bool = False, rate: float | None = None,
             clock=time.perf_counter) -> Estimate:
    """The peak bytes one process adds for a step of `batch` samples (see the module doc for the parts)."""
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    per_block = [t * e * (ACT_PER_TOKEN_WIDTH * act_bytes + (8 if act_bytes == 2 else 0)) for t, e, train in w.blocks]
    kept = [b for b, (_, _, train) in zip(per_block, w.blocks) if train]
    biggest = max(per_block, default=0)
    if grad_checkpointing:  # only each block's input (fp32 residual stream) is kept
        act = sum(t * e * 4 for t, e, train in w.blocks if train) + TRANSIENT_BLOCKS * biggest
    else:
        act = sum(kept) + TRANSIENT_BLOCKS * biggest
    act = batch * (act + w.dense_maps * w.voxels * act_bytes * 3)
    state = w.trainable * STATE_BYTES[w.optimizer] + w.frozen * STATE_BYTES["frozen"]
    if distributed:
        state += w.trainable * 4  # DDP's gradient buckets
    inputs = INPUT_COPIES * batch * w.voxels * 4
    # each loader worker: its prefetched batches, and the step memory the trainer has freed by the time the worker
    # is forked (every epoch): the worker's allocations land in those inherited pages and copy them
    loader = num_workers * (prefetch * batch * w.voxels * item_bytes + act + inputs)
    on_cpu = not device.startswith("cuda")
    copy = (w.trainable * (12 if w.optimizer == "adamw" else 8) + w.frozen * 4) if on_cpu else 0.0
    est = Estimate(state, act, inputs, loader, copy)
    if on_cpu:
        rates = {e: rate or block_rate(e, clock=clock) for e in sorted({e for _, e, _ in w.blocks})}
        est.seconds = sum(step_flops(Workload(0, blocks=[b]), batch, grad_checkpointing) / rates[b[1]]
                          for b in w.blocks) + 3 * batch * w.head_flops / max(rates.values(), default=1.0)
        est.seconds *= STEP_OVERHEAD
        est.rate = step_flops(w, batch, grad_checkpointing) / max(est.seconds, 1e-12)
    return est


def step_flops(w: Workload, batch: int, grad_checkpointing: bool) -> float:
    """Multiply-adds x 2 of a training step: each block's matmuls (12 E^2 per token) and attention (2 T^2 E),
    forward once, backward twice as much for trainable blocks (and a recomputed forward with checkpointing)."""
    total = 0.0
    for t, e, train in w.blocks:
        fwd = 2 * t * 12 * e * e + 4 * t * t * e
        total += fwd * ((4 if grad_checkpointing else 3) if train else 1)
    return batch * (total + 3 * w.head_flops)


def block_rate(width: int, tokens: int = 256, clock=time.perf_counter, budget: float = 0.3) -> float:
    """FLOP/s a transformer block of `width` really reaches on this CPU in training (forward and backward of one
    sample of `tokens` tokens, timm's Block as the models use it, with torch's threads): its matrix products and
    the normalisations, activations and attention that small widths spend much of their time in. One warm-up pass,
    then the fastest of the passes that fit in `budget` seconds (at least one): about 0.1 s for ViT-Tiny's width,
    1-2 s for ViT-L's."""
    from timm.models.vision_transformer import Block

    with torch.random.fork_rng(devices=[]):  # the run's seeded random state is not this probe's to consume
        blk = Block(width, max(1, width // 64), qkv_bias=True)
        x = torch.randn(1, tokens, width, requires_grad=True)
    blk(x).sum().backward()  # warm up at full size (thread pools, allocator, first-touch page faults)
    best, spent = float("inf"), 0.0
    while spent < budget or best == float("inf"):
        t0 = clock()
        blk(x).sum().backward()
        took = clock() - t0
        best, spent = min(best, took), spent + took
        if spent >= budget:
            break
    flops = step_flops(Workload(0, blocks=[(tokens, width, True)]), 1, False)
    return flops / max(best, 1e-9)


def matmul_rate(seconds: float = 0.25, clock=time.perf_counter) -> float:
    """FLOP/s of fp32 matrix products on this CPU with torch's threads, measured for about `seconds` of `clock`
    (wall time; bench/bench_memory_estimate.py passes the process's CPU time)."""
    with torch.random.fork_rng(devices=[]):  # the run's seeded random state is not this probe's to consume
        a, b = torch.randn(768, 768), torch.randn(768, 768 * 4)
    torch.mm(a, b)
    n, t0 = 0, clock()
    while clock() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return n * 2 * 768 * 768 * 768 * 4 / (clock() - t0)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory(device: str) -> tuple[float, str]:
    """(bytes this process may still use, where the number comes from): the GPU's free memory
    (torch.cuda.mem_get_info), or on CPU the smaller of the kernel's MemAvailable and the room left under this
    process's cgroup limit (v2 memory.max, v1 memory.limit_in_bytes)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free), f"free on {torch.cuda.get_device_name(torch.device(device))}"
    avail, source = None, "MemAvailable"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = float(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit and usage is not None and limit < 2 ** 60:
            room = float(limit - usage)
            if avail is None or room < avail:
                avail, source = room, "left under the cgroup limit"
            break
    if avail is None:
        return float("inf"), "unknown"
    return avail, f"available ({source})"


def report(est: Estimate, what: str, processes: int = 1) -> str:
    """The start-up line: the estimate by part and, on CPU, the seconds per step."""
    line = (f"Estimated cost of one step ({what}): peak memory about {est.total / GiB:.2f} GiB per process "
            f"({est.parts()})")
    if processes > 1:
        line += f", x {processes} processes on this machine"
    if est.seconds is not None:
        line += (f"; about {_seconds(est.seconds)} per step on this CPU ({est.rate / 1e9:.0f} GFLOP/s measured on "
                 f"its blocks)")
    return line + "."


def _seconds(s: float) -> str:
    return f"{s:.2g} s" if s < 100 else f"{s / 60:.0f} min"


def check_fits(est: Estimate, available: float, where: str, hint: str, processes: int = 1,
               alternative: Estimate | None = None) -> None:
    """Refuse a run whose estimate (times the processes sharing the memory) exceeds 90% of what is available (the
    rest is for what no estimate sees: the source scans a worker decodes, the allocator's slack), naming the flags
    to change and what --grad_checkpointing would need."""
    need = est.total * processes
    if need <= 0.9 * available:
        return
    alt = (f"; with --grad_checkpointing about {alternative.total * processes / GiB:.1f} GiB"
           if alternative is not None and alternative.total < est.total else "")
    times = "" if processes == 1 else f", x {processes} processes"
    raise UserError(f"This run needs about {need / GiB:.1f} GiB per step ({est.parts()}{times}) but only "
                    f"{available / GiB:.1f} GiB are {where}{alt}: change {hint}, or pass --no_memory_check to start "
                    f"it anyway.")


def local_processes() -> int:
    """Training processes sharing this machine's memory (torchrun's LOCAL_WORLD_SIZE)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check_run(workload: Workload, what: str, hint: str, train: TrainSettings, run: RunOptions) -> Estimate:
    """Rank 0 of each machine says what a step will cost; every process refuses a run that cannot fit (unless
    --no_memory_check). Returns the estimate."""
    procs = 1 if train.device.startswith("cuda") else local_processes()
    kw = dict(batch=train.batch_size, precision=train.precision, device=train.device, num_workers=run.num_workers,
              distributed=train.distributed)
    est = estimate(workload, grad_checkpointing=run.grad_checkpointing, **kw)
    alt = None if run.grad_checkpointing else estimate(workload, grad_checkpointing=True, rate=est.rate, **kw)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(report(est, what, procs), flush=True)
    if not run.no_memory_check:
        available, where = available_memory(train.device)
        check_fits(est, available, where, hint, procs, alt)
    return est
