"""Finetuning: the optimizer, the loss (Supervised), evaluation (classification, regression, segmentation) and the
script's end of each epoch (FinetuneEpochs: validation, best epoch)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models_vit3d import backbone
from util.distributed import all_gather_cat, all_reduce_sum
from util.task.dice import dice_from_stats, dice_stats
from util.runtime import autocast
from util.errors import UserError
from util.task.meta import RunMeta
from util.task.metrics import summary_line
from util.task.record import BestEpoch, CheckpointRecord
from util.task.tasks import Task
from util.train.settings import TrainSettings
from util.data.transport import to_device

LARS_TRUST, LARS_REFERENCE_BATCH = 0.001, 16384  # MAE linear probe: LARS trust coefficient, at this batch


@dataclass
class EvalSettings:
    device: str
    precision: str = "fp32"
    sw_batch_size: int = 2
    sw_overlap: float = 0.5


def build_optimizer(model, settings: TrainSettings, weight_decay: float, layer_decay: float = 0.75,
                    linprobe: bool = False):
    """AdamW with layer-wise lr decay (finetuning) or LARS on the head (linear probe)."""
    lr = settings.schedule.lr
    if linprobe:
        from util.train.lars import LARS

        # LARS moves a weight matrix by lr * trust * |w| per step. MAE's recipe (blr 0.1, trust 0.001) was set at
        # batch 16384; under the linear lr rule a batch of 16 would move the head 1000x less and it would barely
        # leave its init. Scaling trust by 16384 / batch keeps MAE's relative step at any batch (biases are unchanged).
        eff_batch = settings.batch_size * settings.accum_iter * settings.world_size
        trust = LARS_TRUST * max(1.0, LARS_REFERENCE_BATCH / eff_batch)
        return LARS([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay,
                    trust_coefficient=trust)
    from util.train.lr_decay import param_groups_lrd

    groups = param_groups_lrd(model, weight_decay, backbone(model).no_weight_decay(), layer_decay)
    return torch.optim.AdamW(groups, lr=lr, fused=settings.device.startswith("cuda"))


class Supervised:
    """The finetuning objective (util.train.loop.Objective): the task's loss (util.task.tasks) of the model's
    outputs for batches (imgs [N, 1, D, H, W], targets)."""
    tracks_batches = False

    def __init__(self, criterion, task: Task, device: str):
        self.criterion, self.task, self.device = criterion, task, device

    def loss(self, model, batch) -> torch.Tensor:
        imgs, target = to_device(batch, self.device, flip_target=self.task.dense)
        return self.criterion(model(imgs).float(), self.task.prepare_target(target, self.device))

    def batch_ids(self, batch) -> None:
        return None

    def describe(self, batch) -> None:
        return None


@torch.no_grad()
def evaluate(model, criterion, loader, settings: EvalSettings, meta: RunMeta) -> dict:
    """Loss and metrics over the whole (sharded) eval set, gathered across ranks before computing.

    Pass the model without its DDP wrapper: ranks may hold different numbers of batches.
    Returns {'loss', 'n', metric...}; segmentation uses sliding-window inference on whole volumes.
    """
    if meta.task.dense:
        return _evaluate_segmentation(model, criterion, loader, settings, meta)
    model.eval()
    task, device, k = meta.task, settings.device, meta.nb_outputs
    outs, tgts = [], []
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        imgs, target = to_device(batch, device)
        target = task.prepare_target(target, device)
        with autocast(settings.precision, device):
            logits = model(imgs)
        logits = logits.float()
        loss_sum += torch.stack([criterion(logits, target).double() * len(imgs),
                                 torch.tensor(float(len(imgs)), dtype=torch.float64, device=device)])
        outs.append(logits)
        tgts.append(target)  # float [N, K], or class indices (multi-class)
    logits = torch.cat(outs) if outs else torch.zeros(0, k, device=device)
    targets = torch.cat(tgts) if tgts else task.empty_target(k).to(device)
    logits, targets = all_gather_cat(logits).cpu(), all_gather_cat(targets).cpu()
    total = all_reduce_sum(loss_sum).cpu()
    out = {"loss": float(total[0] / max(total[1], 1)), "n": int(total[1])}
    out.update(task.metrics(logits, targets, meta.label_names))
    return out


def _evaluate_segmentation(model, criterion, loader, settings: EvalSettings, meta: RunMeta) -> dict:
    """Sliding-window inference (roi = the model's input size) on whole volumes [1,1,D,H,W]; Dice counts summed
    over ranks."""
    from monai.inferers import sliding_window_inference

    model.eval()
    device, k = settings.device, meta.nb_classes
    stats = torch.zeros(k, 3, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        imgs, mask = to_device(batch, device)
        target = meta.task.prepare_target(mask, device)
        with autocast(settings.precision, device):
            logits = sliding_window_inference(imgs, roi_size=meta.input_size,
                                              sw_batch_size=settings.sw_batch_size,
                                              predictor=lambda t: model(t).float(), overlap=settings.sw_overlap,
                                              mode="gaussian")
        logits = logits.float()
        loss_sum += torch.stack([criterion(logits, target).double() * len(imgs),
                                 torch.tensor(float(len(imgs)), dtype=torch.float64, device=device)])
        stats += dice_stats(logits.argmax(1), target[:, 0], k).to(device)
    stats, total = all_reduce_sum(stats).cpu(), all_reduce_sum(loss_sum).cpu()
    out = {"loss": float(total[0] / max(total[1], 1)), "n": int(total[1])}
    out.update(dice_from_stats(stats))
    return out


class FinetuneEpochs:
    """Finetuning's part of the epoch skeleton (util.train.fit): score the validation set after each epoch, keep the
    best record (`best_path`, checkpoint-best.pth, when it improves; without validation there is no best), print one
    line with the training loss, the validation loss and the task's metrics. Every checkpoint holds the `base`
    record (flags, recipe, RunMeta, preprocessing, loss weights) with the best epoch and the last metrics."""

    def __init__(self, model, criterion, val_loader, eval_settings: EvalSettings, meta: RunMeta,
                 base: CheckpointRecord, best_metric: str, epochs: int, best_path: str):
        self.model, self.criterion, self.val_loader, self.eval_settings = model, criterion, val_loader, eval_settings
        self.meta, self.base, self.best_metric, self.epochs, self.best_path = meta, base, best_metric, epochs, best_path
        self.best, self.metrics = base.best, {}

    def checkpoint_record(self) -> CheckpointRecord:
        return self.base.but(best=self.best, metrics=self.metrics)

    def end_epoch(self, epoch: int, stats: dict) -> tuple[dict, list[str]]:
        metric = self.best_metric
        metrics = evaluate(self.model, self.criterion, self.val_loader, self.eval_settings, self.meta) \
            if self.val_loader else {}
        if metrics and metric not in metrics:
            raise UserError(f"--best_metric {metric} is not computed here; choose one of {sorted(metrics)}.")
        improved = bool(metrics) and self.meta.task.is_better(metrics[metric],
                                                              self.best.value if self.best else None, metric)
        if improved:
            self.best = BestEpoch(metric, float(metrics[metric]), epoch)
        self.metrics = metrics
        line = f"epoch {epoch + 1}/{self.epochs}: train loss {stats['loss']:.4f}"
        if metrics:  # the best epoch counts from 0, as the checkpoint's 'epoch'
            line += (f"; val {summary_line(metrics, (metric,))} (best {metric} "
                     f"{self.best.value if self.best else float('nan'):.4f} at epoch "
                     f"{(self.best.epoch if self.best else 0) + 1})")
        print(line, flush=True)
        stats = {**{f"train_{k}": v for k, v in stats.items()}, **{f"val_{k}": v for k, v in metrics.items()},
                 "epoch": epoch + 1}  # log.txt counts epochs from 1, like the console
        return stats, [self.best_path] if improved else []
