"""On-disk cache of preprocessed volumes: one compressed, checksummed file per volume (format 2).

Images are stored in HU, before the window: uint16 level q holds (q - 32768) * step_hu HU (default step 1 HU: the
whole int16 range, max error 0.5 HU, far below CT noise), so one entry serves every HU window; a window is applied
when the entry is read: x = clip((q - offset) * factor, 0, 1) (`CacheSettings.window_map`, `decode`; the training
device does the same in float32 for cached batches, util.data.transport). Rounding to whole HU leaves the low bits
free of resampling noise, so the bit-shuffled payload compresses (util.volume.cache_format): a 256^3 CT takes
0.15-0.38x the 32 MiB of the earlier uint16 .npy (`bench/bench_cache_format.py`), and keeping HU instead of a
window's levels cost 0.1% more bytes there (the clipped tails are a small part of a CT).

Label maps are stored as uint8 (int16/int32 when needed), other float arrays as float32, both exactly. Every entry
carries a CRC-32 that every read verifies: a damaged entry (flipped bytes, a torn copy) is removed and reported as a
miss, so the caller preprocesses the source again; it is never returned. Writes are atomic (util.atomic), so many
loader workers and ranks can fill one cache at the same time.

The folder's settings (codec, step) are in `cache_format.json`, written by the first process that uses the folder
(main_cache.py --cache_step chooses the step); later readers and writers follow them. A folder of the
earlier format (.npy entries, no checksums) is refused with one sentence saying how to rebuild it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from util.atomic import atomic_write, write_text
from util.errors import UserError
from util.volume import cache_format
from util.volume.cache_format import CODECS, DamagedEntry

QMAX = 65535  # the largest level; also the levels of a [0, 1] array stored without a window
HU_ZERO = 32768  # the level of 0 HU
SETTINGS_NAME = "cache_format.json"
FORMAT_NAME, FORMAT_VERSION = "mae3d-volume-cache", 2
SUFFIX = ".vol"
log = logging.getLogger(__name__)


class SliceDeltas:
    """A cached uint16 volume still holding the differences of consecutive slices (axis 0) in `array`, as
    `VolumeCache.get(..., deltas=True)` may return it: the training device undoes them (util.data.transport), or
    `undo()` here (in place)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def undo(self) -> np.ndarray:
        return cache_format.undelta(self.array)


class CacheFormatError(UserError):
    """A --cache_dir of another format or other settings; the message says how to rebuild or what to pass."""


@dataclass(frozen=True)
class CacheSettings:
    """codec: 'zstd' (slice differences + bit-shuffle + zstd; util.volume.cache_format);
    step_hu: quantisation step of images in HU (level q holds (q - 32768) * step_hu HU)."""

    codec: str = "zstd"
    step_hu: float = 1.0

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise UserError(f"A cache codec must be one of {', '.join(CODECS)}, got {self.codec!r}.")
        if not (np.isfinite(self.step_hu) and self.step_hu > 0):
            raise UserError(f"--cache_step must be a number of HU > 0, got {self.step_hu}.")

    def hu_range(self) -> tuple[float, float]:
        """The HU the levels 0..65535 hold: (-32768, 32767) at 1 HU."""
        return -HU_ZERO * self.step_hu, (QMAX - HU_ZERO) * self.step_hu

    def window_map(self, window: Sequence[float]) -> tuple[float, float]:
        """(offset, factor) turning a level q into the [0, 1] value of HU window (lo, hi): clip((q - offset) *
        factor, 0, 1), offset = 32768 + lo / step, factor = step / (hi - lo), both float32 numbers."""
        lo, hi = float(window[0]), float(window[1])
        rlo, rhi = self.hu_range()
        if lo < rlo or hi > rhi:
            raise UserError(f"The HU window {lo:g} {hi:g} reaches beyond what a cache of --cache_step "
                            f"{self.step_hu:g} holds ({rlo:g} to {rhi:g} HU); use a larger --cache_step.")
        return float(np.float32(HU_ZERO + lo / self.step_hu)), float(np.float32(self.step_hu / (hi - lo)))


IDENTITY = (0.0, float(np.float32(1.0 / QMAX)))  # window_map of a [0, 1] array stored at QMAX levels


def file_stamp(path: str | os.PathLike) -> str:
    """'abs path|mtime_ns|size' of a file; for a folder (DICOM series), of every file in it."""
    p = os.path.abspath(os.fspath(path))
    st = os.stat(p)
    if not os.path.isdir(p):
        return f"{p}|{st.st_mtime_ns}|{st.st_size}"
    parts = [f"{e.name}:{e.stat().st_mtime_ns}:{e.stat().st_size}" for e in sorted(os.scandir(p), key=lambda e: e.name)
             if e.is_file()]
    return p + "|" + hashlib.sha1("\n".join(parts).encode()).hexdigest()


def encode(array: np.ndarray, levels: int | None = None) -> np.ndarray:
    """Array -> stored form. levels given: an image in [0, 1] -> uint16 round(x * levels) (not range-checked).
    Otherwise integers -> the smallest fitting int type, floats in [0, 1] -> uint16 at QMAX levels, other floats
    -> float32."""
    a = np.asarray(array)
    if a.dtype.kind == "f":
        if levels is None and a.size and 0.0 <= float(a.min()) and float(a.max()) <= 1.0:
            levels = QMAX
        if levels is not None:
            scaled = np.multiply(a, np.float32(levels), dtype=np.float32)
            return np.rint(scaled, out=scaled).astype(np.uint16)
        return a.astype(np.float32)
    if a.dtype == np.bool_ or a.size == 0:
        return a.astype(np.uint8)
    lo, hi = int(a.min()), int(a.max())
    for t in (np.uint8, np.int16, np.int32):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            return a.astype(t)
    return a.astype(np.int64)


def decode(stored: np.ndarray, window_map: tuple[float, float] | np.ndarray = IDENTITY) -> np.ndarray:
    """Stored form -> float32 [0, 1] (uint16 levels: clip((q - offset) * factor, 0, 1) in float32, the numbers
    util.data.transport computes on the device) or the stored array itself (label maps, other arrays).
    window_map [C, 4] (several channels, util.volume.channels.level_maps): stored [C, ...], channel c becomes
    clip((q - offset_c) * factor_c, low_c, high_c)."""
    if stored.dtype != np.uint16:
        return stored
    if isinstance(window_map, np.ndarray) and window_map.ndim == 2:
        m = window_map.astype(np.float32).reshape(window_map.shape[0], 4, *([1] * (stored.ndim - 1)))
        v = np.subtract(stored, m[:, 0], dtype=np.float32)
        v *= m[:, 1]
        np.maximum(v, m[:, 2], out=v)
        return np.minimum(v, m[:, 3], out=v)
    offset, factor = window_map
    v = np.subtract(stored, np.float32(offset), dtype=np.float32)
    v *= np.float32(factor)
    return np.clip(v, 0.0, 1.0, out=v)


class VolumeCache:
    """Preprocessed volumes under `cache_dir`, keyed by the source file, its mtime/size, the settings and the
    folder's quantisation step.

    key_parts: the first item is the source path (stamped with abs path, mtime_ns and size, so editing or
    touching the file invalidates the entry); later items are hashed as text, except `pathlib.Path` items,
    which are stamped like the first (e.g. the image a mask was resampled onto). Pass `cfg.key()` among them.
    settings: what main_cache.py was asked for (None: the folder's, or the defaults for a new folder).
    """

    def __init__(self, cache_dir: str | os.PathLike, settings: CacheSettings | None = None) -> None:
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        os.makedirs(self.cache_dir, exist_ok=True)
        self.settings = open_settings(self.cache_dir, settings)
        self._tag = f"format {FORMAT_VERSION} step {self.settings.step_hu:g}"
        self.hits = self.misses = self.damaged = 0

    def window_map(self, window: Sequence[float]) -> tuple[float, float]:
        """`CacheSettings.window_map` of this folder: how its levels become the [0, 1] values of `window`."""
        return self.settings.window_map(window)

    def key(self, key_parts: Sequence) -> str:
        """sha1 hex digest of the stamped parts and of the folder's format and step."""
        first, *rest = key_parts
        items = [file_stamp(first)] + [file_stamp(p) if isinstance(p, Path) else str(p) for p in rest]
        return hashlib.sha1("\x1f".join(items + [self._tag]).encode()).hexdigest()

    def path(self, key_parts: Sequence) -> str:
        k = self.key(key_parts)
        return os.path.join(self.cache_dir, k[:2], k + SUFFIX)

    def _entry(self, key_parts: Sequence) -> str | None:
        try:
            return self.path(key_parts)
        except FileNotFoundError:  # the source is gone: no key, no entry
            return None

    def _drop(self, p: str, source, why: str) -> None:
        """Remove a damaged entry and say so; the caller preprocesses the source again."""
        try:
            os.remove(p)
        except OSError:
            pass
        self.damaged += 1
        log.warning("%s: damaged cache entry (%s); removed, %s is preprocessed again.", p, why, source)

    def get(self, key_parts: Sequence, deltas: bool = False) -> np.ndarray | SliceDeltas | None:
        """The cached array in stored form (images: uint16 levels, see `decode`) or None on a miss; a damaged
        entry is removed and is a miss. deltas=True: an image stored as slice differences comes back as
        SliceDeltas, not undone (the training device undoes them)."""
        p = self._entry(key_parts)
        try:
            if p is None:
                raise FileNotFoundError
            stored, _, left = cache_format.unpack(cache_format.read(p), keep_deltas=deltas)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (DamagedEntry, OSError) as e:
            self._drop(p, key_parts[0], str(e) or type(e).__name__)
            self.misses += 1
            return None
        self.hits += 1
        return SliceDeltas(stored) if left else stored

    def verify(self, key_parts: Sequence) -> bool:
        """True when the entry exists and its checksum holds (read, not decompressed); a damaged one is removed."""
        p = self._entry(key_parts)
        if p is None:
            return False
        try:
            cache_format.check(cache_format.read(p))
            return True
        except FileNotFoundError:
            return False
        except (DamagedEntry, OSError) as e:
            self._drop(p, key_parts[0], str(e) or type(e).__name__)
            return False

    def put(self, key_parts: Sequence, array: np.ndarray) -> str:
        """Store `array` (`encode(array)`: floats in [0, 1] at QMAX levels) atomically; returns the entry's path."""
        stored = encode(array)
        return self.put_stored(key_parts, stored, QMAX if stored.dtype == np.uint16 else 0)

    def put_stored(self, key_parts: Sequence, stored: np.ndarray, levels: int = 0) -> str:
        """Store an array already in stored form (`levels`: QMAX for uint16 levels, 0 for label maps)."""
        data = cache_format.pack(stored, levels, self.settings.codec)

        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)
            self.may_commit(tmp)

        return atomic_write(self.path(key_parts), save)

    def may_commit(self, tmp: str) -> None:
        """Called after an entry's bytes are written to `tmp`, before the rename that makes them the entry (a
        subclass may refuse)."""


def open_settings(cache_dir: str, wanted: CacheSettings | None) -> CacheSettings:
    """The folder's CacheSettings, recorded in `cache_format.json` on first use (`wanted` or the defaults).
    Raises CacheFormatError for a folder of the earlier format or one recorded with other settings than `wanted`."""
    path = os.path.join(cache_dir, SETTINGS_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError("not an object")
    except FileNotFoundError:
        saved = None
    except (OSError, ValueError) as e:
        raise CacheFormatError(f"{path}: is unreadable ({e}); delete it and rerun main_cache.py with the same "
                               f"flags to rebuild the cache's settings.") from None
    if saved is None:
        legacy = _legacy_entry(cache_dir)
        if legacy:
            raise CacheFormatError(
                f"--cache_dir {cache_dir}: holds volumes cached in the earlier uncompressed format (e.g. {legacy}: "
                f".npy, no checksums), which this version no longer reads; delete that folder (or give a new "
                f"--cache_dir) and fill it again with main_cache.py and the same preprocessing flags.")
        settings = wanted or CacheSettings()
        try:
            write_text(path, json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, **asdict(settings)},
                                        indent=1) + "\n")
        except OSError:
            pass  # a read-only folder: reading needs no settings file, writing entries fails on its own
        return settings
    if saved.get("format") != FORMAT_NAME or saved.get("version") != FORMAT_VERSION:
        raise CacheFormatError(f"--cache_dir {cache_dir}: was written by another cache format ({path} says "
                               f"{saved.get('format')!r} version {saved.get('version')!r}, this code writes version "
                               f"{FORMAT_VERSION}); delete that folder (or give a new --cache_dir) and fill it again "
                               f"with main_cache.py.")
    try:
        settings = CacheSettings(str(saved["codec"]), float(saved["step_hu"]))
    except (KeyError, TypeError, ValueError, UserError):
        raise CacheFormatError(f"{path}: has no valid codec and step_hu; delete it and rerun main_cache.py with "
                               f"the same flags.") from None
    if wanted is not None and wanted != settings:
        raise CacheFormatError(f"--cache_dir {cache_dir}: was filled with --cache_step {settings.step_hu:g} (codec "
                               f"{settings.codec}, see {path}), not --cache_step {wanted.step_hu:g}; pass that value or "
                               f"give another --cache_dir.")
    return settings


def _legacy_entry(cache_dir: str) -> str | None:
    """An entry of the earlier format (two-letter subfolder, .npy file) in `cache_dir`, or None."""
    try:
        subs = [e for e in os.scandir(cache_dir) if e.is_dir() and len(e.name) == 2]
    except OSError:
        return None
    for sub in subs:
        try:
            for e in os.scandir(sub.path):
                if e.name.endswith(".npy"):
                    return e.path
                if e.name.endswith(SUFFIX):
                    return None  # entries of this format: the settings file was removed, not an old cache
        except OSError:
            continue
    return None
