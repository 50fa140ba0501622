"""One table of model sizes and one registry of model factories, in the spirit of timm's `register_model` /
`create_model`.

The table is torch-free, so the scripts' `--model` choices and `--help` come from it before torch is imported.
The factories (`mae_vit_<size>_patch16` in models_mae3d.py, `vit_<size>_patch16` in models_vit3d.py) register
themselves with `@register_model` when their module is imported; `create_model(name, **kwargs)` builds any of them.
A name is never spelt twice and never edited to find a sibling: `sibling(name, "vit")` looks the size up.

    from util.nn.registry import create_model
    import models_mae3d  # registers the MAE factories
    model = create_model("mae_vit_large_patch16", img_size=256)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from util.errors import UserError
from util.triple import to_3tuple


@dataclass(frozen=True)
class Size:
    """Widths of one named size: the encoder (shared by the MAE and the ViT) and the MAE's light decoder."""
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int


SIZES: dict[str, Size] = {s.name: s for s in (
    Size("tiny", 192, 12, 3, 128, 4, 4),
    Size("small", 384, 12, 6, 256, 4, 8),
    Size("base", 768, 12, 12, 512, 8, 16),
    Size("large", 1024, 24, 16, 512, 8, 16),  # TANGERINE
    Size("huge", 1280, 32, 16, 512, 8, 16),
)}
# family -> how its factories are named; 'mae': encoder + decoder (models_mae3d), 'vit': encoder (models_vit3d)
FAMILIES = {"mae": "mae_vit_{size}_patch16", "vit": "vit_{size}_patch16"}


@dataclass(frozen=True)
class ModelEntry:
    """What a model name means: its family and its size."""
    name: str
    family: str
    size: Size


_ENTRIES: dict[str, ModelEntry] = {FAMILIES[f].format(size=s): ModelEntry(FAMILIES[f].format(size=s), f, size)
                                   for f in FAMILIES for s, size in SIZES.items()}
_FACTORIES: dict[str, Callable] = {}


@dataclass(frozen=True)
class ModelSpec:
    """The model a run builds: a registry name and its input. Sizes are (D, H, W); the input is a multiple of the
    patch on every axis (one sentence naming the flags otherwise)."""
    name: str
    input_size: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    in_chans: int = 1

    def __post_init__(self) -> None:
        entry(self.name)
        set_ = object.__setattr__
        set_(self, "input_size", to_3tuple(self.input_size, "--input_size"))
        set_(self, "patch_size", to_3tuple(self.patch_size, "--patch_size"))
        if any(s % p for s, p in zip(self.input_size, self.patch_size)):
            raise UserError(f"--input_size {self.input_size} must be a multiple of --patch_size {self.patch_size} on "
                            f"every axis.")

    @property
    def family(self) -> str:
        return entry(self.name).family

    @property
    def size(self) -> Size:
        return entry(self.name).size

    def kwargs(self) -> dict:
        """The factory keywords of this spec (create_model(spec.name, **spec.kwargs()))."""
        return dict(img_size=self.input_size, patch_size=self.patch_size, in_chans=self.in_chans)

    def as_family(self, family: str) -> "ModelSpec":
        """The same input with the model of the same size in `family` (an MAE's encoder: as_family('vit'))."""
        return ModelSpec(sibling(self.name, family), self.input_size, self.patch_size, self.in_chans)

    def describe(self) -> str:
        return f"{self.name} at {'x'.join(map(str, self.input_size))} in {'x'.join(map(str, self.patch_size))} patches"


def model_names(family: str) -> tuple[str, ...]:
    """Every model name of `family` ('mae' or 'vit'), smallest first (torch-free: for --model choices)."""
    return tuple(e.name for e in _ENTRIES.values() if e.family == family)


def entry(name: str) -> ModelEntry:
    """The family and size of model `name`; one sentence listing the names when it is unknown."""
    if name not in _ENTRIES:
        raise UserError(f"Unknown model {name!r}; expected one of {', '.join(_ENTRIES)}.")
    return _ENTRIES[name]


def sibling(name: str, family: str) -> str:
    """The model of the same size in `family` (sibling('mae_vit_base_patch16', 'vit') is 'vit_base_patch16'),
    found through the size, never by editing the name."""
    return FAMILIES[family].format(size=entry(name).size.name)


def size_of(embed_dim: int, depth: int) -> Size | None:
    """The named size with this encoder width and depth (what recognising a checkpoint from its weights needs)."""
    return next((s for s in SIZES.values() if (s.embed_dim, s.depth) == (embed_dim, depth)), None)


def register_model(fn: Callable) -> Callable:
    """Decorator: register a factory under its function name, which must be a row of the table."""
    entry(fn.__name__)
    _FACTORIES[fn.__name__] = fn
    return fn


def create_model(name: str, **kwargs):
    """Build model `name` with `kwargs` (img_size, patch_size, in_chans, ...). Its module must have been imported
    (models_mae3d for 'mae', models_vit3d for 'vit'), as timm's models register on import."""
    e = entry(name)
    if name not in _FACTORIES:
        module = "models_mae3d" if e.family == "mae" else "models_vit3d"
        raise RuntimeError(f"{name} is not registered: import {module} before create_model.")
    return _FACTORIES[name](**kwargs)


def registered(family: str | None = None) -> list[str]:
    """Names of the registered factories (of one family), in table order."""
    return [n for n, e in _ENTRIES.items() if n in _FACTORIES and (family is None or e.family == family)]
