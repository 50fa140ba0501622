"""Finetuning `Custom3DDataset` (classification, multi-label, regression, segmentation) and `resample_to_256`.

Volumes go through exactly the preprocessing of pretraining (`datasets_three_d`); adapt this class when your
labels live somewhere else than the CSV columns below.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset

from datasets_three_d import (Augment3D, PreprocessConfig, VolumeError, _triple, center_crop_or_pad,
                              limit_sitk_threads, load_cached, random_crop, read_path_table, resample_centered, where)
from util.cache import VolumeCache, decode

TASKS = ("classification", "segmentation")


def resample_to_256(image: sitk.Image, is_mask: bool = False) -> sitk.Image:
    """Resample a volume to 256 x 256 x 256 voxels keeping its physical extent (the seed README's example).

    New spacing = old spacing * old size / 256 per axis, same physical box and direction; B-spline for
    images (float32 output), nearest neighbour for label maps (pixel type kept).
    """
    size = (256, 256, 256)
    spacing = [s * n / 256 for s, n in zip(image.GetSpacing(), image.GetSize())]
    if is_mask:
        return resample_centered(image, size, spacing, sitk.sitkNearestNeighbor, 0.0)
    return resample_centered(image, size, spacing, sitk.sitkBSpline, PreprocessConfig().window[0], sitk.sitkFloat32)


def parse_label_columns(df: pd.DataFrame, columns: list[str], csv_path: str, kind: str) -> np.ndarray:
    """Label columns -> float64 [N, K]; kind 'class' (integers >= 0), 'binary' (values in [0, 1]) or 'float'.

    Raises ValueError naming the CSV, the row and the column of the first bad cell.
    """
    out = np.zeros((len(df), len(columns)), np.float64)
    expect = {"class": "a class index 0, 1, 2, ...", "binary": "a number in [0, 1]", "float": "a number"}[kind]
    for j, col in enumerate(columns):
        num = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(num)
        if kind == "class":
            bad |= (num < 0) | (num != np.round(num))
        elif kind == "binary":
            bad |= (num < 0) | (num > 1)
        if bad.any():
            k = int(np.argmax(bad))
            raise ValueError(f"{csv_path}: {where(int(df.index[k]))}, column '{col}': expected {expect}, "
                             f"got {df[col].iloc[k]!r}.")
        out[:, j] = num
    return out


class Custom3DDataset(Dataset):
    """Labelled volumes from a CSV: items (float32 [1, D, H, W] in [0, 1], target).

    target: int64 scalar class index (one label column: binary / multi-class), float32 [K] (several columns:
    multi-label, values in [0, 1]), float32 scalar or [K] (regression), int64 [D, H, W] label map
    (task='segmentation', `Mask` column), or int64 -1 (label_columns=[]: unlabelled).
    nb_classes: for one class column it is max(label) + 1 (at least 2), so classes must be numbered 0..K-1
    (pass nb_classes to fix it, e.g. for a validation set that lacks the last class); K for multi-label /
    regression; for segmentation nb_classes (default 2) bounds the mask values.
    Training: random crop (foreground-centred with probability fg_prob for segmentation) + random flips (+
    intensity jitter), identical for image and mask, from np.random.default_rng([seed, epoch, i]).
    Eval: centre crop / pad to input_size, or the whole preprocessed volume with whole_volume=True.
    """

    def __init__(self, csv_path: str, input_size=256, train: bool = True, preprocess: PreprocessConfig | None = None,
                 task: str = "classification", label_columns: list[str] | None = None, regression: bool = False,
                 multilabel: bool | None = None, cache_dir: str | None = None, seed: int = 0, fg_prob: float = 0.5,
                 intensity_jitter: float = 0.0, nb_classes: int | None = None, whole_volume: bool = False) -> None:
        if task not in TASKS:
            raise ValueError(f"Custom3DDataset: task must be one of {TASKS}, got {task!r}.")
        self.input_size = _triple(input_size, "Custom3DDataset input_size")
        self.cfg = preprocess if preprocess is not None else PreprocessConfig(size=self.input_size)
        self.task, self.train, self.seed, self.epoch = task, train, seed, 0
        self.fg_prob, self.whole_volume = fg_prob, whole_volume
        self.segmentation = task == "segmentation"
        cols = [] if self.segmentation else list(["Label"] if label_columns is None else label_columns)
        self.label_columns = cols
        self.regression = regression
        self.multilabel = (len(cols) > 1 and not regression) if multilabel is None else bool(multilabel)
        self.table = read_path_table(csv_path, ("Path", "Mask") if self.segmentation else ("Path", *cols))
        self.paths: list[str] = list(self.table["Path"])
        self.mask_paths: list[str] | None = list(self.table["Mask"]) if self.segmentation else None
        self.cache = VolumeCache(cache_dir) if cache_dir else None
        self.augment = Augment3D(intensity_jitter=intensity_jitter)
        self._set_labels(str(csv_path), nb_classes)

    def _set_labels(self, csv_path: str, nb_classes: int | None) -> None:
        """targets, nb_classes, label_names, class_counts from the label columns."""
        cols, self.class_counts, self.targets = self.label_columns, None, None
        if self.segmentation or not cols:
            self.nb_classes = int(nb_classes or 2)
            self.label_names = [str(k) for k in range(self.nb_classes)]
            return
        if self.regression:
            y = parse_label_columns(self.table, cols, csv_path, "float").astype(np.float32)
            self.targets, self.nb_classes, self.label_names = y[:, 0] if len(cols) == 1 else y, len(cols), list(cols)
        elif self.multilabel:
            y = parse_label_columns(self.table, cols, csv_path, "binary").astype(np.float32)
            self.targets, self.nb_classes, self.label_names = y, len(cols), list(cols)
            self.class_counts = [int(c) for c in (y > 0.5).sum(0)]
        else:
            y = parse_label_columns(self.table, cols, csv_path, "class")[:, 0].astype(np.int64)
            self.nb_classes = int(nb_classes or max(2, int(y.max()) + 1))
            if y.max() >= self.nb_classes:
                k = int(np.argmax(y >= self.nb_classes))
                raise ValueError(f"{csv_path}: {where(int(self.table.index[k]))}, column '{cols[0]}': class {y[k]} "
                                 f"is >= nb_classes={self.nb_classes}.")
            self.targets, self.label_names = y, [str(k) for k in range(self.nb_classes)]
            self.class_counts = [int(c) for c in np.bincount(y, minlength=self.nb_classes)]

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _target(self, index: int, mask: np.ndarray | None) -> torch.Tensor:
        if self.segmentation:
            return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))
        if self.targets is None:
            return torch.tensor(-1, dtype=torch.int64)
        return torch.as_tensor(self.targets[index])

    def _check_mask(self, mask: np.ndarray, index: int) -> None:
        lo, hi = int(mask.min()), int(mask.max())
        if lo < 0 or hi >= self.nb_classes:
            raise VolumeError(f"{self.mask_paths[index]}: holds label values {lo}..{hi}; expected "
                              f"0..{self.nb_classes - 1} (pass nb_classes to the dataset, --nb_classes to the script).")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        limit_sitk_threads()
        mask_path = self.mask_paths[index] if self.segmentation else None
        img, mask = load_cached(self.paths[index], self.cfg, self.cache, mask_path, decoded=False)
        if mask is not None:
            self._check_mask(mask, index)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            arrays = random_crop([img] if mask is None else [img, mask], self.input_size, rng,
                                 fg_mask=mask, fg_prob=self.fg_prob if mask is not None else 0.0)
            img, mask = self.augment(arrays[0], arrays[1] if mask is not None else None, rng)
        elif self.whole_volume:
            img = decode(img)
        else:
            img = decode(center_crop_or_pad(img, self.input_size, 0.0))
            mask = None if mask is None else center_crop_or_pad(mask, self.input_size, 0)
        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]
        return x, self._target(index, mask)
