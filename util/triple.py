"""One int or three: the (D, H, W) values of sizes, spacings and patch sizes, parsed in one place."""
from __future__ import annotations

from typing import Any

from util.errors import UserError


def to_3tuple(x: Any, name: str = "value", kind: type = int) -> tuple:
    """An int (or float) or a sequence of 1 or 3 of them -> a 3-tuple of positive `kind` values.

    Raises ValueError naming `name` (e.g. '--input_size') for any other length or a value <= 0.
    """
    values = tuple(x) if isinstance(x, (list, tuple)) else (x,)
    if len(values) == 1:
        values = values * 3
    try:
        out = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or any(v <= 0 for v in out) or (kind is int and out != tuple(values)):
        raise UserError(f"{name} must be one positive {kind.__name__} or three (D, H, W), got {x!r}.")
    return out


def optional_3tuple(x: Any, name: str = "value", kind: type = int) -> tuple | None:
    """`to_3tuple`, with None passed through."""
    return None if x is None else to_3tuple(x, name, kind)
