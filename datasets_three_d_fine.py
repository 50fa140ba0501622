"""Finetuning `Custom3DDataset` (classification, multi-label, regression, segmentation) and `resample_to_256`.

Volumes go through exactly the preprocessing of pretraining (util.volume.preprocess); adapt this class when your
labels live somewhere else than the CSV columns below.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from util.errors import UserError
from util.data.channel_table import channel_required, row_sources
from util.data.path_table import read_path_table, roi_points, where
from util.volume.preprocess import PreprocessConfig
from util.volume.resample import resample_centered
from util.task.tasks import Task, from_flags
from util.data.dataset import VolumeDataset, limit_sitk_threads
from util.volume.io import VolumeError


def resample_to_256(image: sitk.Image, is_mask: bool = False) -> sitk.Image:
    """Resample a volume to 256 x 256 x 256 voxels keeping its physical extent (the seed README's example).

    New spacing = old spacing * old size / 256 per axis, same physical box and direction; B-spline for
    images (float32 output), nearest neighbour for label maps (pixel type kept).
    """
    size = (256, 256, 256)
    spacing = [s * n / 256 for s, n in zip(image.GetSpacing(), image.GetSize())]
    if is_mask:
        return resample_centered(image, size, spacing, "nearest", 0.0)
    return resample_centered(image, size, spacing, "bspline", PreprocessConfig().window[0], sitk.sitkFloat32)


class Custom3DDataset(VolumeDataset):
    """Labelled volumes from a CSV: items (float32 [1, D, H, W] in [0, 1], target); with several channels
    (PreprocessConfig.channels) float32 [C, D, H, W].

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
                 task: str | Task = "classification", label_columns: list[str] | None = None, regression: bool = False,
                 multilabel: bool | None = None, cache_dir: str | None = None, seed: int = 0, fg_prob: float = 0.5,
                 intensity_jitter: float = 0.0, nb_classes: int | None = None, whole_volume: bool = False,
                 crops_per_volume: int = 1) -> None:
        """task: 'classification' (with regression / multilabel / the label columns deciding which kind) or
        'segmentation', or a util.task.tasks.Task, which decides alone."""
        kind = task if isinstance(task, Task) else \
            from_flags(task, regression, len(["Label"] if label_columns is None else label_columns), multilabel)
        super().__init__(input_size, train, preprocess, cache_dir, seed, intensity_jitter, crops_per_volume)
        self.task_type, self.fg_prob, self.whole_volume = kind, fg_prob, whole_volume
        self._checked = None  # the last label map whose values were checked
        cols = [] if kind.dense else list(["Label"] if label_columns is None else label_columns)
        self.label_columns = cols
        roi_mask = self.cfg.roi and self.cfg.roi_label is not None
        if kind.dense and self.cfg.roi:
            raise UserError("--roi_mm makes each row a box around a point or a label for classification or "
                            "regression; it cannot be combined with --task segmentation.")
        self.table = read_path_table(csv_path, channel_required(self.cfg, ("Path", "Mask") if kind.dense else
                                     ("Path", "Mask", *cols) if roi_mask else ("Path", *cols)),
                                     unique_paths=not self.cfg.roi)
        self.paths, self.sources = row_sources(self.table, self.cfg, csv_path)
        self.mask_paths = list(self.table["Mask"]) if kind.dense else None
        if self.cfg.roi:  # lesion-level rows: the box around the row's point, or around its Mask's label
            self.rois = list(self.table["Mask"]) if roi_mask else roi_points(self.table, str(csv_path))
            self.row_names = [f"{csv_path}: {where(int(line))}" for line in self.table.index]
        self.record_cache_use()  # how many volumes came from --cache_dir (said once per run by the scripts)
        self.targets, self.class_counts = None, None
        if kind.dense or not cols:
            self.nb_classes = int(nb_classes or 2)
            self.label_names = [str(k) for k in range(self.nb_classes)]
        else:
            labels = kind.parse_labels(self.table, cols, str(csv_path), nb_classes)
            self.targets, self.nb_classes = labels.targets, labels.nb_classes
            self.label_names, self.class_counts = labels.label_names, labels.class_counts

    def _target(self, v: int, mask: np.ndarray | None) -> torch.Tensor:
        if self.task_type.dense:
            return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))
        if self.targets is None:
            return torch.tensor(-1, dtype=torch.int64)
        return torch.as_tensor(self.targets[v])

    def _check_mask(self, mask: np.ndarray, v: int) -> None:
        lo, hi = int(mask.min()), int(mask.max())
        if lo < 0 or hi >= self.nb_classes:
            raise VolumeError(f"{self.mask_paths[v]}: holds label values {lo}..{hi}; expected "
                              f"0..{self.nb_classes - 1} (pass nb_classes to the dataset, --nb_classes to the script).")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        limit_sitk_threads()
        v = self.volume_index(index)
        img, mask = self.load(v)
        if mask is not None and mask is not self._checked:  # once per read, not once per crop of it
            self._check_mask(mask, v)
            self._checked = mask
        x, mask, deferred = self.sample(index, img, mask, whole=self.whole_volume)
        return self.pack(x, self._target(v, mask), deferred)
