"""The rows of main_predict.py's --input_csv: the table as written, each row's path (or channel files), its lesion
point or Mask, and the rows of each process."""
from __future__ import annotations

import pandas as pd

from util.data.channel_table import row_sources
from util.data.path_table import find_column, read_csv_table, resolve_paths, roi_points
from util.errors import UserError


def read_table(csv_path: str) -> pd.DataFrame:
    """The input CSV exactly as written (all cells text), rows numbered from 0; refused when it has no rows."""
    df = read_csv_table(csv_path).reset_index(drop=True)
    if len(df) == 0:
        raise UserError(f"--input_csv {csv_path} has a header but no rows.")
    return df


def read_input_table(csv_path: str) -> tuple[pd.DataFrame, list[str]]:
    """The input CSV exactly as written (all cells text) and the absolute volume path of every row.

    Read by util.data.path_table like every other table; relative paths resolve against the CSV's folder. Missing
    volumes and empty cells are not checked here: they become per-row errors during prediction.
    """
    df = read_table(csv_path)
    return df, row_inputs(df, csv_path)[0]


def row_inputs(df: pd.DataFrame, csv_path: str, cfg=None, four_d: bool = False) -> tuple[list[str], list | None]:
    """Every row's absolute volume path (several channels: its first channel's) and, for a model of several
    channels (`cfg`), every row's ChannelSource tuple (else None). A table without the model's channel columns is
    refused, unless `four_d` (the user typed --channels, saying the order of the volumes of the 4D files in Path)."""
    if cfg is not None and not cfg.plain:
        missing = [c for c in cfg.channel_columns if find_column(df, c) is None]
        if missing and not four_d:
            raise UserError(f"--input_csv {csv_path} has no column {missing[0]!r}; the model reads the channels "
                            f"{','.join(cfg.channel_names)} in this order, one column each (for 4D files in Path "
                            f"holding them in this order, pass --channels {','.join(cfg.channel_names)}).")
        return row_sources(df, cfg, csv_path, check_exists=False)
    col = find_column(df, "Path")
    if col is None:
        raise UserError(f"--input_csv {csv_path} has no 'Path' column (columns: {', '.join(df.columns)}).")
    return resolve_paths(df, col, csv_path, check_exists=False), None


def row_rois(df: pd.DataFrame, csv_path: str, cfg) -> list | None:
    """With ROI settings, each row's centre: its Mask path (cfg.roi_label) or its point (coordX/Y/Z; a cell that is
    not a number becomes that row's error); None without. A missing column stops the run naming the table."""
    if not cfg.roi:
        return None
    if cfg.roi_label is None:
        return roi_points(df, csv_path, check=False)
    col = find_column(df, "Mask")
    if col is None:
        raise UserError(f"--input_csv {csv_path} has no 'Mask' column (columns: {', '.join(df.columns)}); the "
                        f"checkpoint centres each box on label {cfg.roi_label} of the row's Mask.")
    return resolve_paths(df, col, csv_path, check_exists=False)


def shard_rows(paths: list[str], rank: int, world_size: int, by_scan: bool) -> list[int]:
    """This process's rows: strided (rank, rank + W, ...), or with by_scan a contiguous run of the rows ordered by
    path, so that the rows of one scan (lesions) follow each other and the scan is read once (util.volume.preprocess)."""
    if not by_scan:
        return list(range(rank, len(paths), world_size))
    order = sorted(range(len(paths)), key=lambda i: (paths[i], i))
    n = len(order)
    return order[rank * n // world_size:(rank + 1) * n // world_size]
