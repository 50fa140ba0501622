"""The typed settings both trainers share, built once from the flags (util/args.py) and then only read.

    Optimization   what the optimizer and schedule are asked for (--batch_size, --blr/--lr, --epochs, ...)
    RunOptions     where and how the run goes (--output_dir, --resume, checkpoints, workers, seed, device, ...)
    TrainSettings  what the epoch loop (util.train.loop) runs with once the processes are known: the effective
                   batch, the peak lr (blr x effective batch / 256 unless --lr), the warmup that fits the run, the
                   precision resolved for the device; made by `resolve_training`

Each is a frozen dataclass: components receive the part they need, never the command line, and nothing changes a
setting after it is made (a finetuning run that adopts its checkpoint's input size makes a new settings object).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from util.runtime import Runtime, resolve_precision


@dataclass(frozen=True)
class Optimization:
    """--batch_size (per process), --accum_iter, --epochs, --lr (None: from --blr), --blr, --min_lr,
    --warmup_epochs, --weight_decay, --clip_grad (None: no clipping), --precision (auto/bf16/fp16/fp32)."""
    batch_size: int = 8
    accum_iter: int = 1
    epochs: int = 1
    lr: float | None = None
    blr: float = 1e-3
    min_lr: float = 0.0
    warmup_epochs: float = 0
    weight_decay: float = 0.05
    clip_grad: float | None = None
    precision: str = "auto"


@dataclass(frozen=True)
class RunOptions:
    """--output_dir, --log_dir (default: the output folder), --resume (auto/PATH/none), --allow_recipe_change,
    --save_every_minutes, --save_every_steps, --num_workers, --seed, --print_freq, --device (None: cuda when
    available), --compile, --grad_checkpointing, --no_memory_check."""
    output_dir: str
    log_dir: str
    resume: str = "auto"
    allow_recipe_change: bool = False
    save_every_minutes: float = 0.0
    save_every_steps: int = 0
    num_workers: int = 0
    seed: int = 0
    print_freq: int = 20
    device: str | None = None
    compile: bool = False
    grad_checkpointing: bool = False
    no_memory_check: bool = False

    @property
    def fresh(self) -> bool:
        """--resume none: start over even when the folder holds a checkpoint."""
        return self.resume in ("", "none")


@dataclass(frozen=True)
class Schedule:
    """Peak `lr`, reached after `warmup_epochs`, then cosine decay to `min_lr` at `epochs`."""
    lr: float
    epochs: int
    warmup_epochs: float = 0
    min_lr: float = 0.0


@dataclass(frozen=True)
class TrainSettings:
    """What the epoch loop runs with (util.train.settings.resolve_training makes it from the flags and the runtime):
    the peak lr and its schedule are resolved, the precision is the device's."""
    device: str
    precision: str = "fp32"
    batch_size: int = 1
    accum_iter: int = 1
    clip_grad: float | None = None
    print_freq: int = 20
    world_size: int = 1
    rank: int = 0
    distributed: bool = False
    seed: int = 0
    schedule: Schedule = field(default_factory=lambda: Schedule(lr=1e-3, epochs=1))
    epoch_line: bool = False  # the script prints its own line at each epoch's end: no progress line for the last step

    @property
    def effective_batch(self) -> int:
        """Volumes per optimizer step over every process."""
        return self.batch_size * self.accum_iter * self.world_size


def fit_warmup(warmup_epochs: float, epochs: int) -> tuple[float, str | None]:
    """The warmup a run of `epochs` can use: unchanged when shorter than the run, else half the run, so the lr
    reaches its peak and then decays instead of crawling up from 0 for the whole run. Returns (warmup, the one
    line saying it was shortened, or None)."""
    if warmup_epochs < epochs:
        return warmup_epochs, None
    fitted = epochs / 2
    return fitted, (f"--warmup_epochs {warmup_epochs:g} is not shorter than --epochs {epochs}: the lr warms up over "
                    f"the first {fitted:g} epochs instead, then decays (else it would stay near 0 the whole run).")


def resolve_training(optim: Optimization, run: RunOptions, rt: Runtime, epoch_line: bool = False) -> TrainSettings:
    """What the epoch loop runs with on this runtime; one WARNING line when the warmup had to be shortened."""
    effective = optim.batch_size * optim.accum_iter * rt.world_size
    warmup, shortened = fit_warmup(optim.warmup_epochs, optim.epochs)
    if shortened:
        print(f"WARNING: {shortened}")
    lr = optim.lr if optim.lr is not None else optim.blr * effective / 256
    return TrainSettings(device=rt.device, precision=resolve_precision(optim.precision, rt.device),
                         batch_size=optim.batch_size, accum_iter=optim.accum_iter, clip_grad=optim.clip_grad,
                         print_freq=run.print_freq, world_size=rt.world_size, rank=rt.rank,
                         distributed=rt.distributed, seed=run.seed, epoch_line=epoch_line,
                         schedule=Schedule(lr=lr, epochs=optim.epochs, warmup_epochs=warmup, min_lr=optim.min_lr))
