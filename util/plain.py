"""Plain data: what checkpoints, JSON files and recipe comparisons hold (no argparse, pathlib or numpy types)."""
from __future__ import annotations

import argparse
import pathlib


def plain(obj):
    """Convert argparse values (tuples, Paths, Namespaces, numpy scalars) to plain JSON-like Python types."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, frozenset, set)):
        return [plain(v) for v in (sorted(obj) if isinstance(obj, (set, frozenset)) else obj)]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
