"""`PreprocessConfig`: the one small object that says how a row's images become the model's input (stored in every
checkpoint as 'preprocess', in model folders' config.json, and hashed into cache keys).

Channels (issue 32): `channels` names the input channels in order; each is a column of the table (`NAME`, or
`NAME=COLUMN` to read channel NAME from another column, e.g. several CT windows of one Path), or, when the table has
none of those columns, the volumes of a 4D file in its Path column, in that order. `norm` says per channel how its
intensities become the model's: `ct` (clip to the HU `window`, scale to [0, 1]), `zscore` (mean and standard deviation
over the non-zero voxels, nnU-Net's rule for MRI) or `percentile` (clip to the 0.5 and 99.5 percentiles of the
non-zero voxels, scale to [0, 1]). The default, one channel `Path` normalised as `ct`, is what every checkpoint
written before channels existed means, and its `to_dict` is unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, fields

import numpy as np

from util.errors import UserError
from util.triple import optional_3tuple
from util.volume.resample import SITK_INTERPOLATORS
from util.volume.roi import COORD_SYSTEMS

PREPROCESS_VERSION = 1  # bump when the preprocessing changes what it produces (invalidates caches)
INTERPOLATORS = tuple(SITK_INTERPOLATORS)
ROI_FIELDS = ("roi_mm", "roi_coords", "roi_label")
CACHE_KEY_WINDOW = (0.0, 1.0)  # stands for "HU, the window applied when read" in cache keys
NORMS = ("ct", "zscore", "percentile")
BOUNDED_NORMS = ("ct", "percentile")  # give values in [0, 1]
PERCENTILES = (0.5, 99.5)  # the `percentile` normalisation's clip points
DEFAULT_CHANNELS, DEFAULT_NORM = ("Path",), ("ct",)
CHANNEL_FIELDS = ("channels", "norm", "windows")


def channel_name(spec: str) -> str:
    """'t1' of 't1' or of 't1=T1_path'."""
    return spec.split("=", 1)[0]


def channel_column(spec: str) -> str:
    """The table column a channel is read from: 'T1_path' of 't1=T1_path', 't1' of 't1'."""
    return spec.split("=", 1)[-1]


@dataclass
class PreprocessConfig:
    """Preprocessing settings, stored in every checkpoint. Sizes and spacings are (D, H, W).

    spacing None: resample the whole volume to `size` keeping its physical extent (TANGERINE default 256^3).
    spacing given: resample to that spacing (mm), then pad every axis to >= size (datasets crop later).
    Both None: keep the native grid (reorientation and windowing only).
    roi_mm given (lesion-level rows, util.volume.roi): each row is a box of roi_mm (D, H, W) mm centred on the row's
    point (coordX/Y/Z in `roi_coords`, LPS or RAS) or on the centroid of label `roi_label` of its Mask, resampled to
    `size`.
    channels/norm: the input channels and their normalisation (module doc); `window` is the HU window of every `ct`
    channel, `windows` one (LO, HI) per `ct` channel in channel order when they differ (None: `window` for all).
    """

    orientation: str = "LPS"
    size: tuple[int, int, int] | None = (256, 256, 256)
    spacing: tuple[float, float, float] | None = None
    window: tuple[float, float] = (-1200.0, 800.0)
    interpolator: str = "bspline"
    mask_interpolator: str = "nearest"
    roi_mm: tuple[float, float, float] | None = None
    roi_coords: str = "LPS"
    roi_label: int | None = None
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    norm: tuple[str, ...] = DEFAULT_NORM
    windows: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        """Validate every field; a bad one raises UserError naming its flag (--window, --orientation, ...)."""
        self.orientation = str(self.orientation).upper()
        axis = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}
        if sorted(axis.get(c, -1) for c in self.orientation) != [0, 1, 2]:
            raise UserError(f"The orientation (--orientation) must be three letters, one of each L/R, P/A, S/I "
                            f"(e.g. LPS), got {self.orientation!r}.")
        self.size = optional_3tuple(self.size, "The input size (--input_size)")
        self.spacing = optional_3tuple(self.spacing, "The spacing (--spacing)", float)
        self.window = _window(self.window)
        for name in ("interpolator", "mask_interpolator"):
            if getattr(self, name) not in INTERPOLATORS:
                raise UserError(f"The {name.replace('_', ' ')} (--{name}) must be one of {sorted(INTERPOLATORS)}, "
                                f"got {getattr(self, name)!r}.")
        self._check_roi()
        self._check_channels()

    def _check_roi(self) -> None:
        self.roi_mm = optional_3tuple(self.roi_mm, "The ROI size (--roi_mm)", float)
        if self.roi_mm is not None and not all(np.isfinite(v) and v > 0 for v in self.roi_mm):
            raise UserError(f"The ROI size (--roi_mm D H W) must be positive mm, got {self.roi_mm}.")
        self.roi_coords = str(self.roi_coords).upper()
        if self.roi_coords not in COORD_SYSTEMS:
            raise UserError(f"--roi_coords must be one of {', '.join(COORD_SYSTEMS)}, got {self.roi_coords!r}.")
        if self.roi_label is not None:
            if self.roi_mm is None:
                raise UserError("--roi_label needs --roi_mm D H W (the size of the box centred on the label).")
            self.roi_label = int(self.roi_label)
        if self.roi_mm is not None and (self.size is None or self.spacing is not None):
            raise UserError("--roi_mm resamples each box to --input_size: it needs an input size and cannot be "
                            "combined with --spacing (the box's spacing is --roi_mm / --input_size).")

    def _check_channels(self) -> None:
        """channels: unique non-empty names (NAME or NAME=COLUMN); norm: one kind, or one per channel (a single one
        applies to every channel); windows: one (LO, HI) per ct channel, or None."""
        chans = self.channels.split(",") if isinstance(self.channels, str) else list(self.channels)
        chans = [str(c).strip() for c in chans]
        names = [channel_name(c) for c in chans]
        if not chans or any(not n or not channel_column(c) or "," in c for n, c in zip(names, chans)):
            raise UserError(f"--channels must name one or more channels as NAME or NAME=COLUMN separated by commas, "
                            f"got {','.join(chans)!r}.")
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise UserError(f"--channels names channel {dup!r} twice; give every channel its own name (NAME=COLUMN "
                            f"reads several channels from one column).")
        self.channels = tuple(chans)
        norm = self.norm.split(",") if isinstance(self.norm, str) else list(self.norm)
        norm = [str(k).strip().lower() for k in norm]
        if len(norm) == 1:
            norm = norm * len(chans)
        bad = next((k for k in norm if k not in NORMS), None)
        if bad is not None or len(norm) != len(chans):
            why = f"{bad!r} is not one of {', '.join(NORMS)}" if bad is not None else \
                f"it has {len(norm)} entries for {len(chans)} channels"
            raise UserError(f"--norm must be one of {', '.join(NORMS)} for every channel, or one per channel in the "
                            f"order of --channels ({','.join(names)}); {why}.")
        self.norm = tuple(norm)
        if self.windows is not None:
            flat = np.asarray(self.windows, dtype=object).reshape(-1).tolist()
            if len(flat) % 2:
                raise UserError(f"--window takes pairs LO HI, got {len(flat)} numbers.")
            pairs = tuple(_window(flat[k:k + 2]) for k in range(0, len(flat), 2))
            cts = self.norm.count("ct")
            if len(pairs) != cts:
                raise UserError(f"--window gives {len(pairs)} windows (LO HI pairs) for {cts} ct channels; give one "
                                f"window for every ct channel, or one pair for all of them.")
            self.windows, self.window = (pairs, pairs[0]) if len(set(pairs)) > 1 else (None, pairs[0])

    @property
    def roi(self) -> bool:
        """True when rows are boxes around a point or a label (lesion-level rows)."""
        return self.roi_mm is not None

    @property
    def plain(self) -> bool:
        """True for the one `Path` channel normalised as `ct`: every checkpoint written before channels existed,
        read along the original single-channel path ([D, H, W] arrays)."""
        return self.channels == DEFAULT_CHANNELS and self.norm == DEFAULT_NORM

    @property
    def in_chans(self) -> int:
        return len(self.channels)

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(channel_name(c) for c in self.channels)

    @property
    def channel_columns(self) -> tuple[str, ...]:
        return tuple(channel_column(c) for c in self.channels)

    @property
    def bounded(self) -> bool:
        """True when every channel's values lie in [0, 1] (no zscore channel)."""
        return all(k in BOUNDED_NORMS for k in self.norm)

    def channel_window(self, c: int) -> tuple[float, float]:
        """The HU window of channel c (a ct channel)."""
        if self.windows is None:
            return self.window
        return self.windows[self.norm[:c].count("ct")]

    def describe_channels(self) -> str:
        """'t1 (zscore), ct (ct -1200..800 HU), ...' for messages and model cards."""
        return ", ".join(f"{n} ({k}" + (f" {self.channel_window(c)[0]:g}..{self.channel_window(c)[1]:g} HU)"
                                        if k == "ct" else ")")
                         for c, (n, k) in enumerate(zip(self.channel_names, self.norm)))

    def with_overrides(self, **changes) -> "PreprocessConfig":
        """A copy with `changes` applied (list values become tuples), validated again like a new config: the one
        way a flag typed at prediction or caching replaces what a checkpoint stored."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"PreprocessConfig.with_overrides: unknown fields {sorted(unknown)}.")
        if "window" in changes and "windows" not in changes:  # one window typed: for every ct channel
            changes["windows"] = None
        if "channels" in changes and "norm" not in changes and len(set(self.norm)) == 1:
            changes["norm"] = self.norm[:1]  # one normalisation for every channel: for the new channels too
        return dataclasses.replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists). Without an ROI the ROI fields are left out, and the channel
        fields are left out where they hold their defaults, so a whole-volume single-channel CT configuration is
        exactly what it was before they existed: checkpoints of earlier versions pass the recipe check on resume,
        and cache keys stay."""
        d = {k: _plain(v) for k, v in asdict(self).items()}
        defaults = {"channels": list(DEFAULT_CHANNELS), "norm": list(DEFAULT_NORM), "windows": None}
        return {k: v for k, v in d.items() if (self.roi or k not in ROI_FIELDS)
                and not (k in CHANNEL_FIELDS and v == defaults[k])}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        """Inverse of `to_dict`; unknown keys are refused."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"The saved preprocessing has unknown keys {sorted(unknown)}; expected "
                            f"{[f.name for f in fields(cls)]}.")
        return cls(**d)

    def key(self) -> str:
        """Stable 16-hex-digit hash of the settings and of PREPROCESS_VERSION (cache keys)."""
        blob = json.dumps({**self.to_dict(), "_version": PREPROCESS_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def channel_key(self, c: int) -> str:
        """The cache key of channel c's entry: the settings of a one-channel configuration of its normalisation, the
        HU window left out (a ct channel's entry holds HU; the window is applied when read). A ct channel's key is
        the key of the single-channel CT entry of the same file, so CT entries are shared."""
        one = dataclasses.replace(self, channels=DEFAULT_CHANNELS, norm=(self.norm[c],), windows=None)
        return dataclasses.replace(one, window=CACHE_KEY_WINDOW).key()


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def _window(value) -> tuple[float, float]:
    window = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    try:
        out = tuple(float(v) for v in window)
    except (TypeError, ValueError):
        out = (float("nan"),)
    if len(out) != 2 or not out[0] < out[1] or not np.isfinite(out).all():
        raise UserError(f"The HU window (--window LO HI) must have LO < HI, got {' '.join(map(str, window))}; "
                        f"a reversed window would invert every intensity.")
    return out
