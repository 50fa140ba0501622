"""The task names the command lines offer, readable while the flags are parsed (no torch, no pandas): part of the
tasks module, util.task.tasks, which turns them into Task objects."""
from __future__ import annotations

FLAG_CHOICES = ("classification", "segmentation")  # main_finetune.py --task, Custom3DDataset(task=...)
HEAD_TASKS = ("binary", "multiclass", "multilabel", "regression")  # main_predict.py --head_mode: a head without meta
PROBE_TASKS = HEAD_TASKS  # main_evaluate.py --task (besides auto)
PROBE_PROTOCOLS = ("logreg", "knn")  # main_evaluate.py --protocols: linear probe, k-nearest neighbours


def is_dense(task_flag: str | None) -> bool:
    """Whether --task names label maps (segmentation) rather than one label, labels or values per row."""
    return task_flag == "segmentation"
