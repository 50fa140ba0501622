"""The Task objects (util/task/tasks.py) and the typed checkpoint record (util/task/meta.py)."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import models_mae3d
import models_vit3d
from models_build import meta_from_weights
from util.task.record import CheckpointRecord
from util.errors import UserError
from util.task.meta import RunMeta
from util.task.tasks import (TASKS, BinaryTask, EmbeddingTask, MultiClassTask, MultiLabelTask, RegressionTask,
                             SegmentationTask, from_flags, head_task, probe_task, task_named)


def test_flags_and_classes_decide_the_task():
    assert from_flags("classification", n_label_columns=1).resolve(2) == BinaryTask()
    assert from_flags("classification", n_label_columns=1).resolve(5) == MultiClassTask()
    assert from_flags("classification", n_label_columns=3) == MultiLabelTask()
    assert from_flags("classification", regression=True, n_label_columns=2) == RegressionTask()
    assert from_flags("segmentation", regression=True) == SegmentationTask()  # the flag family wins
    with pytest.raises(UserError, match="task must be one of"):
        from_flags("detection")
    assert head_task(1) == BinaryTask() and head_task(4) == MultiClassTask()
    assert head_task(4, "multilabel") == MultiLabelTask()
    with pytest.raises(UserError, match="Unknown task 'segmentation'"):
        head_task(2, "segmentation")  # a head without metadata is never a label-map decoder
    assert probe_task(2, 1) == BinaryTask() and probe_task(7, 1) == MultiClassTask()
    assert probe_task(None, 1) == RegressionTask() and probe_task(None, 3) == MultiLabelTask()


@pytest.mark.parametrize("name, k, cols, width, columns", [
    ("binary", 2, 1, 1, ["0", "1"]), ("multiclass", 4, 1, 4, ["0", "1", "2", "3"]),
    ("multilabel", 3, 3, 3, ["A", "B", "C"]), ("regression", 2, 2, 2, ["A", "B"])])
def test_each_task_owns_its_head_targets_loss_and_columns(name, k, cols, width, columns):
    task = task_named(name)
    assert task.nb_outputs(k, cols) == width
    names = ["A", "B", "C"][:cols] if cols > 1 else [str(c) for c in range(k)]
    assert task.output_columns(names, width, k) == columns
    logits = torch.randn(5, width)
    probs = task.probabilities(logits)
    assert probs.shape == (5, len(columns))
    if task.single_label:
        assert torch.allclose(probs.sum(1), torch.ones(5))
    raw = torch.randint(0, k, (5,)) if task.single_label else torch.rand(5, width).round()
    target = task.prepare_target(raw, "cpu")
    loss = task.criterion()(logits, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert task.empty_target(width).shape[0] == 0


def test_metrics_come_from_the_task_and_pick_the_best_direction():
    y = torch.tensor([0, 1, 1, 0])
    logits = torch.tensor([[-2.0], [3.0], [1.0], [-1.0]])
    m = BinaryTask().metrics(logits, BinaryTask().prepare_target(y, "cpu"), ["0", "1"])
    assert m["auroc"] == 1.0 and m["accuracy"] == 1.0
    assert BinaryTask().best_metric == "auroc" and RegressionTask().best_metric == "mae"
    assert SegmentationTask().best_metric == "dice" and RegressionTask().primary_metric == "r2"
    table = pd.DataFrame({"Path": ["a", "b", "c"], "Label": ["0", "2", "1"]}, index=[2, 3, 4])
    labels = from_flags().parse_labels(table, ["Label"], "t.csv", None)
    assert labels.nb_classes == 3 and labels.class_counts == [1, 1, 1] and list(labels.targets) == [0, 2, 1]
    with pytest.raises(UserError, match=r"t.csv: row 2 \(line 3\), column 'Label': class 2 is >= nb_classes=2"):
        from_flags().parse_labels(table, ["Label"], "t.csv", 2)
    assert MultiLabelTask().predicted_label(["A", "B"], np.array([0.7, 0.2])) == "A"


def test_the_tasks_module_loads_without_torch():
    """main_evaluate.py and its probe worker processes use the tasks; importing torch there cost seconds and
    hundreds of MB per process."""
    code = ("import sys, util.task.tasks, util.evaluate.probe, util.evaluate.report; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_run_meta_fills_what_older_checkpoints_lack_and_round_trips():
    old = {"task": "classification", "mode": "multiclass", "model": "vit_tiny_patch16", "nb_classes": 3,
           "nb_outputs": 3, "input_size": [32, 32, 32]}  # no patch size, labels, pooling, decoder width, probe flag
    meta = RunMeta.from_dict(old, "old.pth")
    assert meta.task == MultiClassTask() and meta.patch_size == (16, 16, 16) and meta.global_pool == "avg"
    assert meta.label_names == ("0", "1", "2") and meta.feature_size == 16 and meta.linprobe is False
    assert meta.output_columns == ["0", "1", "2"]
    stored = meta.to_dict()
    assert stored["mode"] == "multiclass" and stored["task"] == "classification" and stored["input_size"] == [32] * 3
    assert RunMeta.from_dict(stored) == meta
    binary = RunMeta.from_dict({"mode": "binary", "model": "vit_tiny_patch16", "nb_outputs": 1,
                                "input_size": [16] * 3, "future_key": 1})
    assert binary.nb_classes == 2 and binary.to_dict()["future_key"] == 1  # a newer key is kept, not dropped
    with pytest.raises(UserError, match="old.pth: its 'meta' lacks model"):
        RunMeta.from_dict({k: v for k, v in old.items() if k != "model"}, "old.pth")
    with pytest.raises(UserError, match="Unknown task 'ordinal'"):
        RunMeta.from_dict(dict(old, mode="ordinal"))
    assert set(TASKS) == {"binary", "multiclass", "multilabel", "regression", "segmentation", "embedding"}


def test_checkpoints_without_meta_get_a_run_meta_from_their_weights():
    mae = models_mae3d.mae_vit_tiny_patch16(img_size=32, decoder_depth=1)
    meta = meta_from_weights(CheckpointRecord.from_dict({"model": mae.state_dict()}))
    assert meta.task == EmbeddingTask() and meta.task.headless and meta.input_size == (32, 32, 32)
    assert meta.to_dict()["task"] == "embedding" and meta.nb_outputs == 0
    clf = models_vit3d.vit_tiny_patch16(img_size=32, num_classes=1, global_pool="avg")
    meta = meta_from_weights(CheckpointRecord.from_dict({"model": clf.state_dict()}))  # the original project's finetuned classifier
    assert meta.task == BinaryTask() and meta.nb_classes == 2 and meta.global_pool == "avg"
    assert meta_from_weights(CheckpointRecord.from_dict({"model": clf.state_dict()}), head_mode="regression").task == RegressionTask()
