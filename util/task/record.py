"""What a checkpoint holds, as one typed record: the only module that reads or writes a checkpoint's keys.

A checkpoint on disk stays the plain dict every earlier version wrote (it loads with `torch.load(...,
weights_only=True)`): 'model', 'optimizer', 'scaler', 'epoch', 'args' (the run's flags), 'recipe', 'preprocess', and
for finetuning 'meta', 'loss_weights', 'best', 'metrics'; 'progress' inside an epoch. `CheckpointRecord.from_dict`
reads any of them (ours of every version, TANGERINE's and the original project's files, whose weights may sit under
'model', 'state_dict' or 'model_state' or be the dict itself), converting each value to its type once;
`to_dict` writes them back. Older checkpoints stored the preprocessing three times (the flags in 'args', the
recipe's 'preprocess' and 'preprocess'); a record keeps it once, in `preprocess`.

    rec = CheckpointRecord.from_dict(load_checkpoint(path))
    rec.weights, rec.epoch, rec.preprocess, rec.meta, rec.best, rec.data_manifest
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from typing import Any

from util.checkpoint import CorruptCheckpointError, load_checkpoint, strip_prefixes
from util.plain import plain
from util.errors import UserError
from util.run_folder import RunFolder
from util.task.meta import RunMeta
from util.volume.preprocess import PreprocessConfig

WEIGHT_CONTAINERS = ("model", "state_dict", "model_state")  # where files from elsewhere keep their weights
PREPROCESS_FLAGS = ("orientation", "spacing", "window", "interpolator", "roi_mm", "roi_coords", "roi_label")


@dataclass
class EpochProgress:
    """Where an epoch stands (a checkpoint written inside one): optimizer-aligned micro-steps done, and the running
    loss and coverage so far."""
    step: int = 0
    loss_sum: float = 0.0
    count: int = 0
    seen: list = field(default_factory=list)


@dataclass(frozen=True)
class BestEpoch:
    """The best validation epoch so far: `metric`, its `value`, and `epoch` counted from 0 (as 'epoch' is)."""
    metric: str
    value: float
    epoch: int


@dataclass(frozen=True)
class ManifestRef:
    """The pretraining data's manifest (util.data.manifest): its file name beside the checkpoint and its SHA-256."""
    name: str
    sha256: str | None


@dataclass(frozen=True)
class CheckpointRecord:
    """One checkpoint, typed. `weights` is the model's state dict (prefixes such as `module.` stripped); `epoch`
    counts from 0 and is None in weights-only files (mae_pretrained.pth, TANGERINE); `args` is the run's flags as
    plain data; everything else is None (or empty) when the file does not hold it."""
    weights: dict
    epoch: int | None = None
    optimizer: dict | None = None
    scaler: dict | None = None
    progress: EpochProgress | None = None
    args: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    preprocess: PreprocessConfig | None = None
    meta: RunMeta | None = None
    best: BestEpoch | None = None
    loss_weights: Any = None
    metrics: dict = field(default_factory=dict)
    data_manifest: ManifestRef | None = None
    smoothing: float = 0.0
    folder_config: dict | None = None  # a model folder's config.json (util.model_folder), when read from one
    source: str = ""  # the file it was read from (for sentences); not stored

    # --- reading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "the checkpoint") -> "CheckpointRecord":
        """The record of a loaded checkpoint dict (see util.checkpoint.load_checkpoint)."""
        args = d.get("args")
        args = plain(args) if isinstance(args, (dict, argparse.Namespace)) else {}
        pre = d.get("preprocess")
        progress = d.get("progress")
        best = d.get("best") or None
        manifest = args.get("data_manifest")
        return cls(
            weights=_weights(d), epoch=int(d["epoch"]) if d.get("epoch") is not None else None,
            optimizer=d.get("optimizer"), scaler=d.get("scaler") or None,
            progress=EpochProgress(**progress) if progress else None, args=args, recipe=dict(d.get("recipe") or {}),
            preprocess=PreprocessConfig.from_dict(pre) if isinstance(pre, dict) else None,
            meta=RunMeta.from_dict(d["meta"], source) if isinstance(d.get("meta"), dict) else None,
            best=BestEpoch(str(best["metric"]), float(best["value"]), int(best["epoch"])) if best else None,
            loss_weights=d.get("loss_weights"), metrics=dict(d.get("metrics") or {}),
            data_manifest=ManifestRef(str(manifest), args.get("data_manifest_sha256")) if manifest else None,
            smoothing=float(args.get("smoothing") or 0.0), folder_config=d.get("model_folder"), source=source)

    @property
    def resumable(self) -> bool:
        """A training checkpoint (weights and an epoch), not a weights-only file; whether its optimizer state fits
        the run is for the resume to find out (util.train.trainer.restore names what does not fit)."""
        return self.epoch is not None and bool(self.weights)

    @property
    def trained_input_size(self) -> tuple[int, ...] | None:
        """The input size the weights were trained at, as far as the file says (preprocessing, else flags)."""
        size = (self.preprocess.size if self.preprocess else None) or self.args.get("input_size")
        return tuple(size) if isinstance(size, (list, tuple)) else (size,) * 3 if isinstance(size, int) else None

    def encoder_weights(self) -> dict:
        """The weights, or for a segmentation checkpoint (a UNETR3D: the ViT under `encoder.`) its encoder's weights
        without that prefix, so any of our checkpoints can initialise a ViT."""
        sd = self.weights
        if not any(k.startswith("blocks.") for k in sd) and any(k.startswith("encoder.blocks.") for k in sd):
            return {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
        return sd

    # --- writing -------------------------------------------------------------------------------------------------
    def stored_args(self) -> dict:
        """'args' as written: the flags, with the data manifest's name and digest (also the run's args.json)."""
        args = dict(self.args)
        if self.data_manifest is not None:
            args.update(data_manifest=self.data_manifest.name, data_manifest_sha256=self.data_manifest.sha256)
        return plain(args)

    def to_dict(self) -> dict:
        """The plain dict torch.save writes (loads with weights_only=True): the keys every earlier version wrote,
        only those this record holds."""
        out: dict = {"model": self.weights}
        if self.optimizer is not None:
            out["optimizer"] = self.optimizer
        if self.epoch is not None:
            out["epoch"] = self.epoch
        if self.scaler is not None:
            out["scaler"] = self.scaler
        out["args"] = self.stored_args()
        if self.recipe:
            out["recipe"] = plain(self.recipe)
        if self.preprocess is not None:
            out["preprocess"] = self.preprocess.to_dict()
        if self.meta is not None:
            out["meta"] = self.meta.to_dict()
            out["loss_weights"] = self.loss_weights
            out["best"] = {"metric": self.best.metric, "value": self.best.value, "epoch": self.best.epoch} \
                if self.best else {}
            out["metrics"] = plain(self.metrics)
        if self.progress is not None:
            out["progress"] = vars(self.progress)
        return out

    def but(self, **changes) -> "CheckpointRecord":
        """A copy with `changes` (dataclasses.replace)."""
        return replace(self, **changes)


def _weights(d: dict) -> dict:
    """The model weights of a checkpoint dict: under 'model', 'state_dict' or 'model_state', or the dict itself when
    its values are tensors (a raw state dict); DDP / torch.compile prefixes stripped. {} when there are none."""
    for key in WEIGHT_CONTAINERS:
        if isinstance(d.get(key), dict):
            return strip_prefixes(d[key])
    return strip_prefixes({k: v for k, v in d.items() if hasattr(v, "dtype") and hasattr(v, "shape")})


def read_record(path: str | os.PathLike, what: str | None = None) -> CheckpointRecord:
    """load_checkpoint (verified, weights_only) and the record of what it holds; `what` names the flag in
    sentences (e.g. '--finetune x.pth')."""
    return CheckpointRecord.from_dict(load_checkpoint(path), what or str(path))


def find_resume(output_dir: str | os.PathLike) -> tuple[str | None, CheckpointRecord | None]:
    """The newest intact training checkpoint in `output_dir`: checkpoint-last.pth, else the newest numbered one;
    (None, None) when there is none. A damaged, cut or non-finite file is skipped with a warning naming it and what
    failed; when every file is so, UserError (starting over would overwrite them). An unsafe one raises (it was not
    written by us). Returns the path and its record."""
    folder = RunFolder(str(output_dir))
    refused = []
    for path in ([folder.last] if os.path.isfile(folder.last) else []) + folder.numbered_checkpoints():
        try:
            ckpt = load_checkpoint(path)
        except CorruptCheckpointError as e:
            print(f"WARNING: {e} Trying an older checkpoint.")
            refused.append(os.path.basename(path))
            continue
        rec = CheckpointRecord.from_dict(ckpt, path)
        if rec.resumable:
            return path, rec
    if refused:
        raise UserError(f"No intact checkpoint to resume in {output_dir}: {', '.join(refused)} refused (see the "
                        f"warnings above); pass --resume none to start over, which overwrites them.")
    return None, None


def weights_of(ckpt: dict) -> dict:
    """The model weights of a loaded checkpoint dict in any container (see CheckpointRecord.weights)."""
    return _weights(ckpt)


def require(rec: CheckpointRecord, what: str, *, meta: bool = False) -> CheckpointRecord:
    """One sentence when the record lacks what the caller needs: a finetuned model's meta."""
    if meta and rec.meta is None:
        raise UserError(f"{rec.source} is not a finetuned checkpoint (it has no 'meta'); {what} needs one written by "
                        f"main_finetune.py.")
    return rec
