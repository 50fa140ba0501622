"""The pretraining `Custom3DDataset`: the place to adapt how pretraining reads your scans.

Pipeline (util.volume.preprocess, one code path for every script): read (SimpleITK: NIfTI, NRRD, MetaImage, DICOM
folder) -> reorient (LPS) -> resample (whole volume to `size` keeping its physical extent, or to `spacing` then
pad) -> HU window -> [0, 1] -> optional cache (util.volume.cache) -> crop / flips (util.data.augment) -> [1, D, H, W].
Adapt `Custom3DDataset` (or the table it reads) to your data layout; keep the preprocessing shared.
"""
from __future__ import annotations

import logging

import torch

from util.data.channel_table import channel_required, row_sources
from util.data.path_table import read_path_table
from util.volume.preprocess import PreprocessConfig
from util.data.dataset import VolumeDataset, limit_sitk_threads
from util.volume.io import VolumeError

log = logging.getLogger(__name__)


class Custom3DDataset(VolumeDataset):
    """Pretraining volumes from a CSV (`Path` column) or a text list. Items: (float32 [1, D, H, W] in [0, 1], i);
    with several channels (PreprocessConfig.channels: one column each, or 4D files) float32 [C, D, H, W].

    Adapt this class to your data. Training: random crop (when the preprocessed volume is larger than
    input_size) + random flips (+ jitter), drawn from np.random.default_rng([seed, epoch, i]) so batches do not
    depend on the number of workers. Eval: centre crop / pad. With skip_bad a bad volume is logged, recorded in
    `bad_files` (per process) and replaced by the next readable one. `i` is the row (0-based) asked for.
    """

    def __init__(self, data_path: str, input_size=256, train: bool = True,
                 preprocess: PreprocessConfig | None = None, cache_dir: str | None = None, seed: int = 0,
                 skip_bad: bool = False, intensity_jitter: float = 0.0, crops_per_volume: int = 1) -> None:
        super().__init__(input_size, train, preprocess, cache_dir, seed, intensity_jitter, crops_per_volume)
        self.table = read_path_table(data_path, channel_required(self.cfg),  # skip_bad: missing files are bad files
                                     check_exists=not skip_bad)
        if skip_bad and cache_dir:  # rows main_cache.py could not preprocess, listed in <cache_dir>/failures.csv
            from util.data.cache_fill import drop_known_failures

            self.table = drop_known_failures(self.table, data_path, cache_dir, self.cfg.key())
        self.paths, self.sources = row_sources(self.table, self.cfg, data_path, check_exists=not skip_bad)
        self.skip_bad = skip_bad
        self.record_cache_use()  # how many volumes came from --cache_dir (said once per run by the scripts)
        self.bad_files: list[str] = []

    def _first_readable(self, v: int):
        for k in range(len(self.paths)):
            u = (v + k) % len(self.paths)
            try:
                return u, self.load(u)[0]
            except (VolumeError, OSError) as e:
                if not self.skip_bad:
                    raise
                log.warning("skipping bad volume: %s", e)
                if self.paths[u] not in self.bad_files:
                    self.bad_files.append(self.paths[u])
        raise RuntimeError("Custom3DDataset: every volume failed to load (see the warnings above).")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        limit_sitk_threads()
        v = self.volume_index(index)
        x, _, deferred = self.sample(index, self._first_readable(v)[1])
        return self.pack(x, v, deferred)
