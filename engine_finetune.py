"""Finetuning pieces: task meta, losses, optimizer, one training epoch, and evaluation (classification,
regression, segmentation)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from util import train_loop
from util.cli import autocast
from util.distributed import all_gather_cat, all_reduce_sum
from util.metrics import classification_metrics, dice_from_stats, dice_stats, regression_metrics
from util.model_build import logits_to_probs, nb_outputs

LOWER_IS_BETTER = ("loss", "mae", "rmse")
LARS_TRUST, LARS_REFERENCE_BATCH = 0.001, 16384  # MAE linear probe: LARS trust coefficient, at this batch


def default_best_metric(mode: str) -> str:
    return {"regression": "mae", "segmentation": "dice"}.get(mode, "auroc")


def is_better(value: float, best: float | None, metric: str) -> bool:
    """True when `value` improves on `best` (None: nothing yet). Non-finite values never improve."""
    if not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def make_meta(args, ds) -> dict:
    """Everything util.model_build needs to rebuild the model from the checkpoint alone."""
    cols = list(args.label_columns or ["Label"])
    nb_classes = args.nb_classes or int(ds.nb_classes)
    if args.task == "segmentation":
        mode = "segmentation"
    elif args.regression:
        mode = "regression"
    elif len(cols) > 1:
        mode = "multilabel"
    else:
        mode = "binary" if nb_classes <= 2 else "multiclass"
    names = cols if mode in ("multilabel", "regression") else [str(n) for n in ds.label_names]
    return dict(task=args.task, mode=mode, model=args.model, nb_classes=nb_classes,
                nb_outputs=nb_outputs(mode, nb_classes, len(cols)), label_names=names, label_columns=cols,
                input_size=list(args.input_size), patch_size=list(args.patch_size), global_pool=args.pool,
                feature_size=args.feature_size, linprobe=bool(args.linprobe), in_chans=1)


class EvalShardSampler(torch.utils.data.Sampler):
    """Rank r gets indices r, r + W, r + 2W, ...: every sample exactly once across ranks, no padding duplicates."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def prepare_target(target: torch.Tensor, mode: str, device) -> torch.Tensor:
    """Dataset targets to loss targets: binary [N,1] float, multiclass [N] long, multilabel/regression [N,K]
    float, segmentation [N,1,D,H,W] long."""
    target = target.to(device, non_blocking=True)
    n = target.shape[0]
    if mode == "multiclass":
        return target.long().reshape(n)
    if mode == "segmentation":
        return target.long().unsqueeze(1)
    return target.float().reshape(n, -1)


def _pos_weight(spec, counts: np.ndarray, n: int, k: int):
    """--pos_weight as a tensor [k]: 'auto' = negatives / positives per column, or 1 or k numbers."""
    if not spec:
        return None
    if len(spec) == 1 and str(spec[0]).lower() == "auto":
        pos = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
        return torch.tensor((n - pos) / pos, dtype=torch.float32)
    try:
        values = [float(v) for v in spec]
    except ValueError:
        raise ValueError(f"--pos_weight takes 'auto' or numbers, got {spec}.") from None
    if len(values) not in (1, k):
        raise ValueError(f"--pos_weight takes 1 or {k} numbers (one per label column), got {len(values)}.")
    return torch.tensor(values * (k // len(values)), dtype=torch.float32)


def positive_counts(dataset) -> tuple[np.ndarray, int]:
    """Positives per output column and the number of samples, from the training labels."""
    y = np.asarray(dataset.targets, dtype=np.float64)
    return (y.reshape(len(y), -1) > 0.5).sum(0), len(y)


def loss_weights(mode: str, args, train_dataset) -> dict:
    """Class-imbalance weights from the training labels: {'pos_weight': [K] or None, 'class_weight': [K] or None}.

    --pos_weight (binary/multilabel BCE): 'auto' = negatives / positives per column, or explicit numbers.
    --class_weights auto (multiclass CE): N / (K * count_k).
    """
    out = {"pos_weight": None, "class_weight": None}
    if mode == "multiclass" and args.class_weights == "auto":
        counts = np.maximum(np.asarray(train_dataset.class_counts, dtype=np.float64), 1.0)
        out["class_weight"] = torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)
        print(f"Class weights (auto, from training counts {list(map(int, counts))}): "
              f"{[round(float(w), 3) for w in out['class_weight']]}")
    elif mode in ("binary", "multilabel") and args.pos_weight:
        counts, n = positive_counts(train_dataset)
        out["pos_weight"] = _pos_weight(args.pos_weight, counts, n, len(counts))
        print(f"BCE pos_weight: {[round(float(w), 3) for w in out['pos_weight']]}")
    return out


def build_criterion(mode: str, smoothing: float = 0.0, weights: dict | None = None, device="cpu") -> nn.Module:
    """Loss for `mode`: BCEWithLogits (binary, multilabel), CE with label smoothing (multiclass), MSE (regression),
    DiceCE with softmax and one-hot targets (segmentation). `weights` comes from `loss_weights`."""
    weights = weights or {}
    if mode == "segmentation":
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)
    if mode == "regression":
        return nn.MSELoss()
    if mode == "multiclass":
        return nn.CrossEntropyLoss(weight=weights.get("class_weight"), label_smoothing=smoothing).to(device)
    return nn.BCEWithLogitsLoss(pos_weight=weights.get("pos_weight")).to(device)


def build_optimizer(args, model):
    """AdamW with layer-wise lr decay (finetuning) or LARS on the head (linear probe)."""
    if args.linprobe:
        from util.lars import LARS

        # LARS moves a weight matrix by lr * trust * |w| per step. MAE's recipe (blr 0.1, trust 0.001) was set at
        # batch 16384; under the linear lr rule a batch of 16 would move the head 1000x less and it would barely
        # leave its init. Scaling trust by 16384 / batch keeps MAE's relative step at any batch (biases are unchanged).
        eff_batch = args.batch_size * args.accum_iter * args.world_size
        trust = LARS_TRUST * max(1.0, LARS_REFERENCE_BATCH / eff_batch)
        return LARS([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay,
                    trust_coefficient=trust)
    from util.lr_decay import param_groups_lrd

    vit = getattr(model, "encoder", model)
    groups = param_groups_lrd(model, args.weight_decay, vit.no_weight_decay(), args.layer_decay)
    return torch.optim.AdamW(groups, lr=args.lr, fused=args.device.startswith("cuda"))


def train_one_epoch(model, criterion, loader, optimizer, scaler, epoch: int, args, tb=None) -> dict:
    """Finetune for one epoch on batches (imgs [N, 1, D, H, W], targets)."""
    def compute_loss(m, batch):
        logits = m(batch[0].to(args.device, non_blocking=True))
        return criterion(logits.float(), prepare_target(batch[1], args.mode, args.device))

    return train_loop.train_one_epoch(model, loader, optimizer, scaler, epoch, args, compute_loss, tb)


def compute_metrics(logits: torch.Tensor, targets: torch.Tensor, meta: dict) -> dict:
    """Metrics of gathered outputs: logits [N, nb_outputs] and loss targets (see prepare_target)."""
    mode = meta["mode"]
    if mode == "regression":
        out = regression_metrics(logits.numpy(), targets.numpy())
        if targets.shape[1] > 1:
            for k, name in enumerate(meta["label_names"]):
                out[f"mae_{name}"] = float((logits[:, k] - targets[:, k]).abs().mean())
        return out
    probs = logits_to_probs(logits, mode).numpy()
    y = targets.numpy()
    if mode == "binary":
        y = y.reshape(-1).round().astype(np.int64)
    return classification_metrics(probs, y, mode, meta["label_names"])


def _empty_target(mode: str, k: int) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long) if mode == "multiclass" else torch.zeros(0, k)


@torch.no_grad()
def evaluate(model, criterion, loader, args, meta: dict) -> dict:
    """Loss and metrics over the whole (sharded) eval set, gathered across ranks before computing.

    Pass the model without its DDP wrapper: ranks may hold different numbers of batches.
    Returns {'loss', 'n', metric...}; segmentation uses sliding-window inference on whole volumes.
    """
    if meta["mode"] == "segmentation":
        return _evaluate_segmentation(model, criterion, loader, args, meta)
    model.eval()
    mode, device, k = meta["mode"], args.device, meta["nb_outputs"]
    outs, tgts = [], []
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    for imgs, target in loader:
        imgs = imgs.to(device, non_blocking=True)
        target = prepare_target(target, mode, device)
        with autocast(args.precision, device):
            logits = model(imgs)
        logits = logits.float()
        loss_sum += torch.stack([criterion(logits, target).double() * len(imgs),
                                 torch.tensor(float(len(imgs)), dtype=torch.float64, device=device)])
        outs.append(logits)
        tgts.append(target.float() if mode != "multiclass" else target)
    logits = torch.cat(outs) if outs else torch.zeros(0, k, device=device)
    targets = torch.cat(tgts) if tgts else _empty_target(mode, k).to(device)
    logits, targets = all_gather_cat(logits).cpu(), all_gather_cat(targets).cpu()
    total = all_reduce_sum(loss_sum).cpu()
    out = {"loss": float(total[0] / max(total[1], 1)), "n": int(total[1])}
    out.update(compute_metrics(logits, targets, meta))
    return out


def _evaluate_segmentation(model, criterion, loader, args, meta: dict) -> dict:
    """Sliding-window inference (roi = --input_size) on whole volumes [1,1,D,H,W]; Dice counts summed over ranks."""
    from monai.inferers import sliding_window_inference

    model.eval()
    device, k = args.device, meta["nb_classes"]
    stats = torch.zeros(k, 3, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    for imgs, mask in loader:
        imgs = imgs.to(device, non_blocking=True)
        target = prepare_target(mask, "segmentation", device)
        with autocast(args.precision, device):
            logits = sliding_window_inference(imgs, roi_size=tuple(meta["input_size"]),
                                              sw_batch_size=args.sw_batch_size, predictor=lambda t: model(t).float(),
                                              overlap=args.sw_overlap, mode="gaussian")
        logits = logits.float()
        loss_sum += torch.stack([criterion(logits, target).double() * len(imgs),
                                 torch.tensor(float(len(imgs)), dtype=torch.float64, device=device)])
        stats += dice_stats(logits.argmax(1), target[:, 0], k).to(device)
    stats, total = all_reduce_sum(stats).cpu(), all_reduce_sum(loss_sum).cpu()
    out = {"loss": float(total[0] / max(total[1], 1)), "n": int(total[1])}
    out.update(dice_from_stats(stats))
    return out
