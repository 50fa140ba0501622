"""What both `Custom3DDataset` classes share: preprocessing through the cache, per-(seed, epoch, index) random
crops and flips, K crops per volume read, and the compact transport of cached volumes to the training device.

Transport: by default items are float32 [1, D, H, W] in [0, 1]. The training scripts switch on
`transport = "uint16"`: cached volumes then travel as their stored uint16 levels of HU (bit-cast to int16, which
every device supports; half the bytes of float32) plus the flips still to be done (one bit per axis: the worker
copies nothing) and the (offset, factor) of the HU window, and `util.data.transport.to_device` flips them and
applies the window on the device, giving exactly the float32 numbers of the default.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset

from util.data.augment import Augment3D, center_crop_or_pad, foreground_index, random_crop
from util.volume.cache import IDENTITY, SliceDeltas, VolumeCache, decode
from util.errors import UserError
from util.volume.channels import check_bounded, level_maps, load_row
from util.volume.preprocess import PreprocessConfig
from util.runtime import available_cpus
from util.triple import to_3tuple

TRANSPORTS = ("float32", "uint16")


def limit_sitk_threads() -> None:
    """Inside a DataLoader worker, share the cores between workers instead of oversubscribing them."""
    info = torch.utils.data.get_worker_info()
    if info is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, available_cpus() // info.num_workers))


class VolumeDataset(Dataset):
    """Base of the datasets: `paths` (and optional `mask_paths`) preprocessed by `preprocess`, cropped to
    `input_size`. Item i is crop i % K of volume i // K (K = crops_per_volume); a sampler that keeps the K
    indices of a volume together (util.data.sampler.EpochSampler) makes each worker read the volume once."""

    def __init__(self, input_size=256, train: bool = True, preprocess: PreprocessConfig | None = None,
                 cache_dir: str | None = None, seed: int = 0, intensity_jitter: float = 0.0,
                 crops_per_volume: int = 1) -> None:
        self.input_size = to_3tuple(input_size, "Custom3DDataset input_size")
        self.cfg = preprocess if preprocess is not None else PreprocessConfig(size=self.input_size)
        self.train, self.seed, self.epoch = train, seed, 0
        self.crops_per_volume = max(1, int(crops_per_volume)) if train else 1
        self.cache = VolumeCache(cache_dir) if cache_dir else None
        # uint16 volumes -> [0, 1]: the window applied to the cache's HU levels (a window it cannot hold: refused);
        # several channels: per channel (offset, factor, low, high), util.volume.channels.level_maps
        if self.cfg.plain:
            self.window_map = self.cache.window_map(self.cfg.window) if self.cache is not None else IDENTITY
        else:
            self.window_map = level_maps(self.cfg, self.cache)
        if intensity_jitter > 0:
            check_bounded(self.cfg, "--intensity_jitter (scale and shift clipped to [0, 1])")
        self.augment = Augment3D(intensity_jitter=intensity_jitter)
        self.transport, self.fg_prob = "float32", 0.0
        self.paths: list[str] = []  # per volume, its Path (several channels: the first channel's file)
        self.sources: list | None = None  # several channels: per volume its ChannelSource tuple (data.channel_table)
        self.mask_paths: list[str] | None = None
        self.rois: list | None = None  # ROI preprocessing: per volume, its point (x, y, z) or its Mask path
        self.row_names: list[str] | None = None  # 'table row R (line L)' per volume, to name a row's ROI error
        self._last: tuple | None = None  # (volume index, image, mask) of the last volume read by this process
        self._cache_record: torch.Tensor | None = None  # per volume: 0 not read, 1 from the cache, 2 preprocessed

    def record_cache_use(self) -> None:
        """Start recording, per volume, whether its first read came from the cache or preprocessed it (call after
        `paths` is set, before a DataLoader starts its workers). The record is in shared memory, so the loader
        workers' reads count too; `cache_use()` sums it."""
        if self.cache is None:
            return
        record = torch.zeros(len(self.paths), dtype=torch.uint8)
        try:
            record.share_memory_()
        except RuntimeError:  # no shared memory here: the reads of this process only
            pass
        self._cache_record = record

    def cache_use(self) -> tuple[int, int] | None:
        """(volumes read from the cache, volumes preprocessed and stored in it) so far; None without a cache."""
        if self._cache_record is None:
            return None
        counts = torch.bincount(self._cache_record.long(), minlength=3)
        return int(counts[1]), int(counts[2])

    def __len__(self) -> int:
        return len(self.paths) * self.crops_per_volume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_transport(self, transport: str) -> None:
        """'float32' (the contract: float32 items) or 'uint16' (cached volumes as stored; see the module doc)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}.")
        self.transport = transport

    def volume_index(self, index: int) -> int:
        return index // self.crops_per_volume

    def load(self, v: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocessed (image, mask or None) of volume v, through the cache; uint16 when it came from it."""
        if self._last is not None and self._last[0] == v:
            return self._last[1], self._last[2]
        mask_path = self.mask_paths[v] if self.mask_paths is not None else None
        misses = self.cache.misses if self.cache is not None else 0
        roi = self.rois[v] if self.rois is not None else None
        try:
            # training in uint16 transport: a whole-depth crop of a hit keeps its slice differences for the device
            deltas = self.train and self.transport == "uint16" and self.augment.intensity_jitter <= 0 and \
                self.crops_per_volume == 1 and self.sources is None
            row = self.paths[v] if self.sources is None else self.sources[v]
            img, mask = load_row(row, self.cfg, self.cache, mask_path, decoded=False, roi=roi, deltas=deltas)
            if isinstance(img, SliceDeltas) and img.array.shape[0] != self.input_size[0]:
                img = img.undo()  # a crop or pad along the slices needs the values
        except UserError as e:
            if roi is None or self.row_names is None:
                raise
            raise UserError(f"{self.row_names[v]}: {e}") from None
        if self._cache_record is not None and v < len(self._cache_record) and self._cache_record[v] == 0:
            self._cache_record[v] = 1 if self.cache.misses == misses else 2
        if self.crops_per_volume > 1:
            self._last = (v, img, mask)
        return img, mask

    def _foreground(self, mask: np.ndarray | None) -> np.ndarray | None:
        """Foreground indices of the remembered volume's mask (None: computed by random_crop when needed)."""
        if mask is None or self._last is None or self._last[2] is not mask or self.fg_prob <= 0:
            return None
        if len(self._last) == 3:
            self._last = (*self._last, foreground_index(mask, self.input_size))
        return self._last[3]

    def sample(self, index: int, img: np.ndarray, mask: np.ndarray | None = None, whole: bool = False
               ) -> tuple[torch.Tensor, np.ndarray | None, int]:
        """Training: random crop + flips from np.random.default_rng([seed, epoch, index]); eval: centre crop/pad
        (or the whole volume). Returns (image tensor [1, D, H, W], mask array or None, work left to the device:
        flips (bit 0 the innermost axis, bit 1 the middle one, bit 2 the first) and, bit 3, slice differences to undo
        (a SliceDeltas image from `load`, whole along the slices))."""
        deferred = 0
        if isinstance(img, SliceDeltas):  # only from `load` in uint16 training, where the crop keeps every slice
            img, deferred = img.array, 8
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            arrays = random_crop([img] if mask is None else [img, mask], self.input_size, rng, fg_mask=mask,
                                 fg_prob=self.fg_prob if mask is not None else 0.0, fg=self._foreground(mask))
            crop = arrays[0]
            if self.augment.intensity_jitter > 0:  # jitter works on float images: decode the crop (not the volume)
                crop = decode(crop, self.window_map)
            if self.transport == "uint16" and crop.dtype == np.uint16:  # the device flips: no copy here
                axes, _ = self.augment.draw(rng)  # the draws Augment3D.apply makes
                deferred += sum(1 << (2 - a) for a in axes)  # spatial axes 0, 1, 2 (D, H, W)
                img, mask = crop, None if mask is None else np.ascontiguousarray(arrays[1])
            else:
                img, mask, _ = self.augment.apply(crop, arrays[1] if mask is not None else None, rng)
        elif not whole:
            img = center_crop_or_pad(img, self.input_size, 0.0)
            mask = None if mask is None else np.ascontiguousarray(center_crop_or_pad(mask, self.input_size, 0))
        if img.dtype == np.uint16 and self.transport == "uint16":  # a whole fresh volume is not copied
            x = torch.from_numpy(np.require(img, requirements=["C", "W"]).view(np.int16))
        else:
            x = torch.from_numpy(np.ascontiguousarray(decode(img, self.window_map), dtype=np.float32))
        return (x[None] if x.dim() == 3 else x), mask, deferred

    def pack(self, x: torch.Tensor, target, deferred: int) -> tuple:
        """The item: (image, target), plus the deferred flips (bits, see `sample`) and the window's (offset, factor)
        in uint16 transport."""
        if self.transport == "uint16":
            return (x, target, torch.tensor(int(deferred), dtype=torch.uint8),
                    torch.tensor(self.window_map, dtype=torch.float32))
        return x, target


def cache_use_line(ds, cache_dir: str | None, device: str = "cpu") -> str | None:
    """One sentence on how many training volumes came from --cache_dir and how many were preprocessed so far,
    summed over ranks (call on every rank); None without a cache or for a dataset that does not record it."""
    use = ds.cache_use() if hasattr(ds, "cache_use") else None
    if not cache_dir or use is None:
        return None
    from util.distributed import all_reduce_sum

    hit, made = (int(x) for x in all_reduce_sum(torch.tensor(use, device=device)).cpu())
    total = len(ds.paths)
    return (f"--cache_dir {cache_dir}: {hit} of {total} training volumes came from the cache, {made} were "
            f"preprocessed and stored there" + (f", {total - hit - made} not read yet" if hit + made < total else "")
            + ".")
