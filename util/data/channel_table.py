"""The rows of a table as the model's input channels (util.volume.channels): per row, its Path (a single-channel CT
configuration), or the ChannelSource of each channel named by --channels, read from the columns of those names
(NAME=COLUMN: another column), or from the volumes of a 4D file in the Path column when the table has none of them.
"""
from __future__ import annotations

import os

import pandas as pd

from util.data.path_table import find_column, resolve_paths
from util.errors import UserError
from util.volume.channels import ChannelSource
from util.volume.preprocess_config import PreprocessConfig


def channel_required(cfg: PreprocessConfig, required=("Path",)) -> tuple[str, ...]:
    """The columns a table must have besides its channels (`required` without Path, which a channel table may
    lack)."""
    return tuple(required) if cfg.plain else tuple(c for c in required if c != "Path")


def row_sources(df: pd.DataFrame, cfg: PreprocessConfig, data_path: str, check_exists: bool = True
                ) -> tuple[list[str], list[tuple[ChannelSource, ...]] | None]:
    """(each row's first-channel path, each row's ChannelSource tuple or None for a plain CT configuration, whose
    rows are their Path). One sentence naming the table and the channel for a column that is missing."""
    data_path = os.path.abspath(os.fspath(data_path))
    if cfg.plain:
        return list(df["Path"]), None
    columns = cfg.channel_columns
    found = [find_column(df, c) for c in columns]
    if all(found):
        per = [resolve_paths(df, col, data_path, check_exists) for col in found]
        sources = [tuple(ChannelSource(p) for p in row) for row in zip(*per)]
        return [s[0].path for s in sources], sources
    if not any(found) and "Path" in df.columns and cfg.in_chans > 1:
        paths = resolve_paths(df, "Path", data_path, check_exists)
        n = cfg.in_chans
        return paths, [tuple(ChannelSource(p, k, n) for k in range(n)) for p in paths]
    missing = [c for c, f in zip(columns, found) if not f]
    four_d = " (or a Path column of 4D files holding the channels in this order)" if cfg.in_chans > 1 else ""
    name = cfg.channel_names[columns.index(missing[0])]
    raise UserError(f"{data_path}: has no column {missing[0]!r} for channel {name!r}; the model's channels are "
                    f"{','.join(cfg.channel_names)} in this order, so the table needs one column per channel{four_d} "
                    f"(columns: {', '.join(map(str, df.columns))}).")
