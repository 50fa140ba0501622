"""Metrics agree with hand-computed values and never crash on single-class labels."""
import math

import numpy as np
import pytest
import torch

from util.errors import UserError
from util.task.dice import dice_from_stats, dice_per_class, dice_stats
from util.task.metrics import binary_metrics, multiclass_metrics, multilabel_metrics, regression_metrics
from util.task.tasks import task_named


def test_binary_perfect_and_reversed_auroc():
    targets = np.array([0, 0, 1, 1, 1])
    pos = np.array([0.1, 0.2, 0.7, 0.8, 0.9])
    perfect = binary_metrics(np.stack([1 - pos, pos], 1), targets, ["neg", "pos"])
    assert perfect["auroc"] == 1.0 and perfect["auroc_pos"] == 1.0
    assert perfect["accuracy"] == 1.0 and perfect["f1"] == 1.0
    reversed_ = binary_metrics(1 - pos, targets, ["Label"])
    assert reversed_["auroc"] == 0.0 and reversed_["auroc_Label"] == 0.0
    assert reversed_["accuracy"] == 0.0


def test_binary_balanced_accuracy_on_imbalanced_toy():
    # 8 negatives, 2 positives; predict all negative except one positive found.
    targets = np.array([0] * 8 + [1, 1])
    pos = np.array([0.1] * 8 + [0.9, 0.2])
    m = binary_metrics(pos, targets, ["Label"])
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    # precision 1, recall 0.5 -> F1 = 2/3
    assert m["f1"] == pytest.approx(2 / 3)


def test_single_class_gives_nan_auroc_without_crash():
    m = binary_metrics(np.array([0.2, 0.7, 0.4]), np.array([1, 1, 1]), ["Label"])
    assert math.isnan(m["auroc"]) and math.isnan(m["auroc_Label"])
    assert m["accuracy"] == pytest.approx(1 / 3)


def test_multiclass_macro_and_missing_class():
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    targets = np.array([0, 1, 0, 1])  # class 2 never present -> its auroc is nan and left out
    m = multiclass_metrics(probs, targets, ["a", "b", "c"])
    assert m["auroc_a"] == 1.0 and m["auroc_b"] == 1.0 and math.isnan(m["auroc_c"])
    assert m["auroc"] == 1.0
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0
    # macro F1 over the 3 listed classes: class c has no support and no predictions -> 0
    assert m["f1"] == pytest.approx(2 / 3)


def test_multilabel_per_label_auroc():
    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    probs = np.array([[0.9, 0.8], [0.2, 0.1], [0.8, 0.3], [0.1, 0.9]])  # label x perfect, label y reversed-ish
    m = multilabel_metrics(probs, targets, ["x", "y"])
    assert m["auroc_x"] == 1.0
    assert m["auroc_y"] == pytest.approx(0.0)
    assert m["auroc"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(4 / 8)


def test_classification_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same non-zero number of rows"):
        binary_metrics(np.zeros((3, 2)), np.zeros(4), ["Label"])
    with pytest.raises(UserError, match="Unknown task 'ordinal'"):
        task_named("ordinal")


def test_regression_metrics():
    m = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 6.0]))
    assert m["mae"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(1.0)
    assert m["r2"] == pytest.approx(1 - 4.0 / 14.0)
    assert "r2" not in regression_metrics(np.array([1.0]), np.array([2.0]))


def _cubes():
    """Two 2x2x2 cubes (8 voxels each) of class 1 overlapping by 4 voxels, and a class-2 voxel only in pred."""
    pred = np.zeros((6, 6, 6), dtype=np.int64)
    target = np.zeros_like(pred)
    pred[1:3, 1:3, 1:3] = 1
    target[1:3, 1:3, 2:4] = 1
    pred[5, 5, 5] = 2
    return pred, target


def test_dice_of_overlapping_cubes():
    pred, target = _cubes()
    d = dice_per_class(pred, target, num_classes=4)
    assert d["dice_1"] == pytest.approx(2 * 4 / (8 + 8))
    assert d["dice_2"] == 0.0
    assert math.isnan(d["dice_3"])  # absent in both: nan, skipped from the mean
    assert d["dice"] == pytest.approx(0.25)
    assert "dice_0" not in d
    assert dice_per_class(torch.from_numpy(pred), torch.from_numpy(target), 4, include_background=True)["dice_0"] > 0.9
    assert dice_per_class(target, target, 2)["dice"] == 1.0


def test_dice_stats_summed_over_halves_equals_whole():
    rng = np.random.default_rng(0)
    pred = torch.from_numpy(rng.integers(0, 3, size=(4, 8, 8, 8)))
    target = torch.from_numpy(rng.integers(0, 3, size=(4, 8, 8, 8)))
    whole = dice_per_class(pred, target, 3)
    stats = dice_stats(pred[:2], target[:2], 3) + dice_stats(pred[2:], target[2:], 3)
    assert stats.shape == (3, 3)
    assert dice_from_stats(stats) == pytest.approx(whole)
    assert stats[:, 1].sum() == pred.numel() and stats[:, 2].sum() == target.numel()


def test_dice_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels in"):
        dice_stats(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="same shape"):
        dice_stats(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2)


def test_best_checkpoint_keeps_the_lowest_error_for_every_error_metric():
    from util.task.tasks import RegressionTask

    is_better = RegressionTask().is_better  # every task ranks its metrics the same way

    for metric in ("loss", "mae", "rmse", "mae_age", "rmse_volume_ml"):
        assert is_better(0.1, 0.5, metric) and not is_better(0.5, 0.1, metric), metric
    for metric in ("auroc", "auroc_1", "dice", "balanced_accuracy"):
        assert is_better(0.9, 0.5, metric) and not is_better(0.5, 0.9, metric), metric
    assert is_better(0.3, None, "mae_age") and not is_better(float("nan"), 0.5, "auroc")
