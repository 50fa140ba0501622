"""The task types, one object each: what a head predicts and how it is trained, read and scored.

A `Task` owns its number of outputs, label parsing, loss targets, loss and class-imbalance weights, probabilities,
prediction columns, metrics (those of finetuning and the weighted ones of main_evaluate.py's bootstrap) and which
metric is better when larger. Scripts and engines hold a Task and ask it; nothing outside this module compares a
task name. Its `name` is what checkpoints store as meta['mode'] (util.task.meta), so old files keep loading.

Adding a task type: a subclass here, registered in TASKS (and a head in models_build when it is not a linear one).
torch is imported where a method needs it, so that main_evaluate.py and its probe workers use the tasks without it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence

import numpy as np
import pandas as pd

from util.data.path_table import numeric_columns, where
from util.errors import UserError
from util.task import metrics as M
from util.task import weighted as W
from util.task.flags import FLAG_CHOICES, HEAD_TASKS, is_dense

if TYPE_CHECKING:
    import torch


@dataclass
class Labels:
    """A table's labels: targets (int64 [N] classes, float32 [N, K] multi-label, float32 [N] or [N, K] values), the
    class count (K for multi-label and regression), names and per-class counts (None for regression)."""
    targets: np.ndarray
    nb_classes: int
    label_names: list[str]
    class_counts: list[int] | None


@dataclass(frozen=True)
class Task:
    """One task type (see the module docstring). Subclasses set the traits and override what differs; two Task
    objects are equal when they are of the same type."""
    name: ClassVar[str] = ""
    family: ClassVar[str] = "classification"  # stored as meta['task']; main_finetune.py --task (or embedding)
    headless: ClassVar[bool] = False      # no head: embeddings only
    dense: ClassVar[bool] = False         # label maps: whole volumes (sliding windows) at evaluation, batch 1
    single_label: ClassVar[bool] = False  # one class per row (binary, multi-class): stratified folds, accuracy
    multi_label: ClassVar[bool] = False   # several independent 0/1 labels per row
    continuous: ClassVar[bool] = False    # values, not classes
    best_metric: ClassVar[str] = "auroc"  # what picks checkpoint-best.pth by default
    primary_metric: ClassVar[str] = "auroc"  # main_evaluate.py's headline metric, then the second one
    headline: ClassVar[tuple[str, ...]] = ("auroc", "balanced_accuracy")
    value_prefix: ClassVar[str] = "prob_"  # prediction table: prob_<class> or pred_<target>
    max_classes: ClassVar[int | None] = None  # binary: 2
    lower_is_better: ClassVar[tuple[str, ...]] = ("loss", "mae", "rmse")  # every other metric: higher is better

    # --- heads and labels -------------------------------------------------------------------------------------
    def nb_outputs(self, nb_classes: int, n_label_columns: int) -> int:
        """Width of the head."""
        return nb_classes

    def classes_of_head(self, nb_outputs: int) -> int:
        """The class count of a head of `nb_outputs` (a binary head: one logit, two classes)."""
        return int(nb_outputs)

    def resolve(self, nb_classes: int) -> "Task":
        """The task once the classes are known (one label column: binary or multi-class); others are themselves."""
        return self

    def parse_labels(self, table: pd.DataFrame, columns: list[str], csv_path: str,
                     nb_classes: int | None) -> Labels:
        raise UserError(f"A {self.name} task reads no label columns.")

    # --- training ----------------------------------------------------------------------------------------------
    def prepare_target(self, target: torch.Tensor, device) -> torch.Tensor:
        """Dataset targets to loss targets (float [N, K] unless a subclass says otherwise)."""
        target = target.to(device, non_blocking=True)
        return target.float().reshape(target.shape[0], -1)

    def empty_target(self, k: int) -> torch.Tensor:
        """A 0-row loss target (a rank that holds no evaluation sample)."""
        import torch
        return torch.zeros(0, k)

    def loss_weights(self, targets, class_counts, pos_weight=None, class_weights: str = "none") -> dict:
        """Class-imbalance weights from the training labels: {'pos_weight': [K] or None, 'class_weight': [K] or
        None} (see the classification tasks)."""
        return {"pos_weight": None, "class_weight": None}

    def criterion(self, smoothing: float = 0.0, weights: dict | None = None, device="cpu") -> torch.nn.Module:
        raise NotImplementedError

    # --- outputs -----------------------------------------------------------------------------------------------
    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-class probabilities [N, K] from logits (regression: the values)."""
        return logits.float()

    def output_columns(self, label_names: Sequence[str], nb_outputs: int, nb_classes: int) -> list[str]:
        """Names of the probability / value columns, one per output column: the label names when there is one per
        column, else the indices."""
        names = [str(n) for n in label_names or []]
        k = self._n_columns(nb_outputs, nb_classes)
        return names if len(names) == k else [str(i) for i in range(k)]

    def _n_columns(self, nb_outputs: int, nb_classes: int) -> int:
        return int(nb_classes)

    def predicted_label(self, names: list[str], probs: np.ndarray) -> str:
        """The `pred` cell of one row: the most probable class (continuous tasks have no `pred` column)."""
        return names[int(np.argmax(probs))]

    # --- metrics -----------------------------------------------------------------------------------------------
    def metrics(self, logits: torch.Tensor, targets: torch.Tensor, label_names: Sequence[str]) -> dict:
        """Metrics of gathered outputs: logits [N, nb_outputs] and loss targets (see prepare_target)."""
        return self.probability_metrics(self.probabilities(logits).numpy(), targets.numpy(), label_names)

    def probability_metrics(self, probs: np.ndarray, targets: np.ndarray, label_names: Sequence[str]) -> dict:
        """Metrics of probabilities (see `probabilities`) against targets (class indices [N], 0/1 [N, K], values)."""
        raise NotImplementedError

    def is_better(self, value: float, best: float | None, metric: str) -> bool:
        """True when `value` of `metric` improves on `best` (None: nothing yet). Non-finite values never improve."""
        if not math.isfinite(value):
            return False
        lower = metric.split("_")[0] in self.lower_is_better  # 'mae_<label>' of a multi-output regression too
        return best is None or not math.isfinite(best) or (value < best if lower else value > best)

    def weighted_metrics(self, y: np.ndarray, scores: np.ndarray, pred: np.ndarray | None, w: np.ndarray,
                         names: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """main_evaluate.py's metrics under each row of bootstrap weights w [B, n] -> {name: [B]} (util.task.weighted)."""
        raise NotImplementedError


class _Classes(Task):
    """Shared by the classification tasks: class-imbalance weights."""

    def loss_weights(self, targets, class_counts, pos_weight=None, class_weights: str = "none") -> dict:
        out = super().loss_weights(targets, class_counts)
        if pos_weight:  # BCE heads (binary, multi-label): 'auto' = negatives / positives per column, or numbers
            y = np.asarray(targets, dtype=np.float64)
            counts = (y.reshape(len(y), -1) > 0.5).sum(0)
            out["pos_weight"] = _pos_weight(pos_weight, counts, len(y), len(counts))
            print(f"BCE pos_weight: {[round(float(w), 3) for w in out['pos_weight']]}")
        return out

    def criterion(self, smoothing: float = 0.0, weights: dict | None = None, device="cpu") -> torch.nn.Module:
        import torch.nn as nn
        return nn.BCEWithLogitsLoss(pos_weight=(weights or {}).get("pos_weight")).to(device)


class _SingleLabel(_Classes):
    """One class per row from one label column; `resolve` makes it binary or multi-class."""
    name = "single-label"
    single_label = True

    def resolve(self, nb_classes: int) -> Task:
        return BinaryTask() if nb_classes <= 2 else MultiClassTask()

    def parse_labels(self, table, columns, csv_path, nb_classes) -> Labels:
        """Class indices 0..K-1; K is max(label) + 1 (at least 2) unless nb_classes is given."""
        y = numeric_columns(table, columns, csv_path, "class")[:, 0].astype(np.int64)
        k = int(nb_classes or max(2, int(y.max()) + 1))
        if y.max() >= k:
            i = int(np.argmax(y >= k))
            raise UserError(f"{csv_path}: {where(int(table.index[i]))}, column '{columns[0]}': class {y[i]} is >= "
                            f"nb_classes={k}.")
        return Labels(y, k, [str(c) for c in range(k)], [int(c) for c in np.bincount(y, minlength=k)])


class BinaryTask(_SingleLabel):
    """Two classes, one logit, BCE; probabilities (P(0), P(1))."""
    name = "binary"
    max_classes = 2

    def nb_outputs(self, nb_classes: int, n_label_columns: int) -> int:
        return 1

    def _n_columns(self, nb_outputs: int, nb_classes: int) -> int:
        return 2

    def classes_of_head(self, nb_outputs: int) -> int:
        return 2

    def probabilities(self, logits):
        import torch
        p = torch.sigmoid(logits.float().reshape(-1, 1))
        return torch.cat([1 - p, p], dim=1)

    def probability_metrics(self, probs, targets, label_names):
        y = np.asarray(targets).reshape(-1).round().astype(np.int64)
        return M.binary_metrics(probs, y, list(label_names))

    def weighted_metrics(self, y, scores, pred, w, names=()):
        return W.binary(np.asarray(y), np.asarray(scores, np.float64), pred, np.atleast_2d(w))


class MultiClassTask(_SingleLabel):
    """K > 2 classes, softmax cross-entropy (label smoothing, optional class weights)."""
    name = "multiclass"

    def prepare_target(self, target, device):
        target = target.to(device, non_blocking=True)
        return target.long().reshape(target.shape[0])

    def empty_target(self, k):
        import torch
        return torch.zeros(0, dtype=torch.long)

    def loss_weights(self, targets, class_counts, pos_weight=None, class_weights: str = "none") -> dict:
        import torch
        out = {"pos_weight": None, "class_weight": None}
        if class_weights == "auto":  # N / (K * count_k)
            counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
            out["class_weight"] = torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)
            print(f"Class weights (auto, from training counts {list(map(int, counts))}): "
                  f"{[round(float(w), 3) for w in out['class_weight']]}")
        return out

    def criterion(self, smoothing=0.0, weights=None, device="cpu"):
        import torch.nn as nn
        return nn.CrossEntropyLoss(weight=(weights or {}).get("class_weight"), label_smoothing=smoothing).to(device)

    def probabilities(self, logits):
        return logits.float().softmax(-1)

    def probability_metrics(self, probs, targets, label_names):
        return M.multiclass_metrics(probs, np.asarray(targets).astype(np.int64), list(label_names))

    def weighted_metrics(self, y, scores, pred, w, names=()):
        y = np.asarray(y)
        truth = [y == c for c in range(np.asarray(scores).shape[1])]
        return W.classes(truth, np.asarray(scores, np.float64), y, pred, np.atleast_2d(w), names)


class _PerColumn(Task):
    """One output per label column (multi-label, regression)."""

    def nb_outputs(self, nb_classes: int, n_label_columns: int) -> int:
        return n_label_columns

    def _n_columns(self, nb_outputs: int, nb_classes: int) -> int:
        return int(nb_outputs)


class MultiLabelTask(_PerColumn, _Classes):
    """Several 0/1 label columns, one logit and BCE each."""
    name = "multilabel"
    multi_label = True

    def parse_labels(self, table, columns, csv_path, nb_classes) -> Labels:
        y = numeric_columns(table, columns, csv_path, "binary").astype(np.float32)
        return Labels(y, len(columns), list(columns), [int(c) for c in (y > 0.5).sum(0)])

    def probabilities(self, logits):
        import torch
        return torch.sigmoid(logits.float())

    def predicted_label(self, names, probs):
        """The ';'-joined labels with p >= 0.5."""
        return ";".join(n for n, p in zip(names, probs) if p >= 0.5)

    def probability_metrics(self, probs, targets, label_names):
        return M.multilabel_metrics(probs, np.asarray(targets), list(label_names))

    def weighted_metrics(self, y, scores, pred, w, names=()):
        y = np.asarray(y)
        truth = [y[:, j] == 1 for j in range(np.asarray(scores).shape[1])]
        return W.classes(truth, np.asarray(scores, np.float64), None, pred, np.atleast_2d(w), names)


class RegressionTask(_PerColumn):
    """Values of one or more label columns, MSE."""
    name = "regression"
    continuous = True
    best_metric = "mae"
    primary_metric = "r2"
    headline = ("r2", "mae")
    value_prefix = "pred_"

    def parse_labels(self, table, columns, csv_path, nb_classes) -> Labels:
        y = numeric_columns(table, columns, csv_path, "float").astype(np.float32)
        return Labels(y[:, 0] if len(columns) == 1 else y, len(columns), list(columns), None)

    def criterion(self, smoothing=0.0, weights=None, device="cpu"):
        import torch.nn as nn
        return nn.MSELoss()

    def metrics(self, logits, targets, label_names):
        out = M.regression_metrics(logits.numpy(), targets.numpy())
        if targets.shape[1] > 1:
            for k, name in enumerate(label_names):
                out[f"mae_{name}"] = float((logits[:, k] - targets[:, k]).abs().mean())
        return out

    def weighted_metrics(self, y, scores, pred, w, names=()):
        return W.regression(np.asarray(y, np.float64), np.asarray(scores, np.float64), np.atleast_2d(w))


class SegmentationTask(Task):
    """K-class label maps (a Mask column), DiceCE with softmax; Dice per class."""
    name = family = "segmentation"
    dense = True
    best_metric = "dice"

    def prepare_target(self, target, device):
        return target.to(device, non_blocking=True).long().unsqueeze(1)

    def criterion(self, smoothing=0.0, weights=None, device="cpu"):
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)


class EmbeddingTask(Task):
    """A checkpoint without a head (pretraining, TANGERINE): embeddings only."""
    name = family = "embedding"
    headless = True

    def nb_outputs(self, nb_classes: int, n_label_columns: int) -> int:
        return 0


TASKS: dict[str, type[Task]] = {t.name: t for t in (BinaryTask, MultiClassTask, MultiLabelTask, RegressionTask,
                                                      SegmentationTask, EmbeddingTask)}


def task_named(name: str, allowed: Sequence[str] | None = None) -> Task:
    """The task of a stored or typed name; one sentence for an unknown one."""
    choices = tuple(allowed or TASKS)
    if name not in choices:
        raise UserError(f"Unknown task {name!r}; expected one of {', '.join(choices)}.")
    return TASKS[name]()


def as_task(task: str | Task) -> Task:
    """A Task, or the task of a name."""
    return task if isinstance(task, Task) else task_named(task)


def from_flags(task: str = "classification", regression: bool = False, n_label_columns: int = 1,
               multilabel: bool | None = None) -> Task:
    """The task of main_finetune.py's flags (--task, --regression, --label_columns) before the classes are known:
    one label column gives a single-label task that `resolve(nb_classes)` makes binary or multi-class."""
    if task not in FLAG_CHOICES:
        raise UserError(f"task must be one of {FLAG_CHOICES}, got {task!r}.")
    if is_dense(task):
        return SegmentationTask()
    if regression:
        return RegressionTask()
    if (n_label_columns > 1) if multilabel is None else multilabel:
        return MultiLabelTask()
    return _SingleLabel()


def head_task(nb_outputs: int, name: str | None = None) -> Task:
    """The task of a checkpoint's head without metadata: `name` (--head_mode) or, by default, binary for one output
    and multi-class for more."""
    return task_named(name or ("binary" if nb_outputs == 1 else "multiclass"), HEAD_TASKS)


def probe_task(single_label_classes: int | None, n_columns: int) -> Task:
    """main_evaluate.py --task auto: several columns are multi-label; one column of classes (numbers with few
    integer values, or text) is binary or multi-class; other numbers are regression."""
    if n_columns > 1:
        return MultiLabelTask()
    if single_label_classes is None:
        return RegressionTask()
    return _SingleLabel().resolve(single_label_classes)


def _pos_weight(spec, counts: np.ndarray, n: int, k: int):
    """--pos_weight as a tensor [k]: 'auto' = negatives / positives per column, or 1 or k numbers."""
    import torch
    if len(spec) == 1 and str(spec[0]).lower() == "auto":
        pos = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
        return torch.tensor((n - pos) / pos, dtype=torch.float32)
    try:
        values = [float(v) for v in spec]
    except ValueError:
        raise UserError(f"--pos_weight takes 'auto' or numbers, got {spec}.") from None
    if len(values) not in (1, k):
        raise UserError(f"--pos_weight takes 1 or {k} numbers (one per label column), got {len(values)}.")
    return torch.tensor(values * (k // len(values)), dtype=torch.float32)

