"""Inputs of `main_evaluate.py`: embedding files as `main_predict.py --embeddings` writes them, the label table,
and how their rows are joined.

An embedding file is `.npy` (float [N, D], read memory-mapped) with its `<file>.rows.csv` (the input columns of
each row and `error`), or `.csv` / `.parquet` (those columns, then emb_0 .. emb_{D-1}). Rows are joined to the label
table by the `--id_columns` (default Path), compared as written. Every problem is one sentence naming the file,
the row and what was expected.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from util.errors import UserError
from util.data.path_table import find_column, read_csv_table, where
from util.task.flags import PROBE_TASKS
from util.task.tasks import Task, probe_task, task_named

AUTO = "auto"  # --task auto: the labels decide
MAX_CLASSES = 20  # --task auto: an integer label with more distinct values is a regression target
KEY_SEP = "\x1f"


@dataclass
class FeatureSet:
    """One named set of features: an embedding file's matrix (memory-mapped for .npy) and its row table, or
    columns of the label table (`ids` None, `matrix` already aligned)."""
    name: str
    source: str
    matrix: np.ndarray
    ids: pd.DataFrame | None = None


def named(spec: str, flag: str) -> tuple[str, str]:
    """'NAME=VALUE' -> (NAME, VALUE); a bare VALUE is named after its file name."""
    name, sep, value = spec.partition("=")
    if not sep:
        name, value = re.sub(r"\.(npy|csv|parquet|pth|pt|gz)$", "", os.path.basename(spec)), spec
    if not name.strip() or not value.strip():
        raise UserError(f"{flag} {spec!r}: expected NAME=VALUE (for example mae=emb.npy).")
    return name.strip(), value.strip()


def open_embeddings(name: str, path: str) -> FeatureSet:
    """The rows table and the matrix of an embedding file; nothing but the rows table is read yet for .npy."""
    if not os.path.isfile(path):
        raise UserError(f"--embeddings {name}={path}: file not found; expected main_predict.py --embeddings output "
                        f"(.npy with its .rows.csv, .csv or .parquet).")
    if path.endswith(".npy"):
        rows_path = path + ".rows.csv"
        if not os.path.isfile(rows_path):
            raise UserError(f"{path}: its row table {rows_path} is missing; main_predict.py writes both, and the "
                            f"rows cannot be matched to labels without it.")
        try:
            matrix = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{path}: is not a readable .npy file (cut short or damaged: {e}).") from None
        ids = read_csv_table(rows_path)
        if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.floating) or len(matrix) != len(ids):
            raise UserError(f"{path}: holds a {matrix.dtype} array of shape {matrix.shape}, but {rows_path} has "
                            f"{len(ids)} rows; expected float [{len(ids)}, D] (one row per line of the row table).")
        return FeatureSet(name, path, matrix, ids)
    if path.endswith(".parquet"):
        if importlib.util.find_spec("pyarrow") is None:
            raise UserError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow).")
        table = pd.read_parquet(path)
        table.index = pd.RangeIndex(2, len(table) + 2, name="line")
    elif path.endswith(".csv"):
        table = read_csv_table(path)
    else:
        raise UserError(f"--embeddings {path}: must end in .npy, .csv or .parquet.")
    cols = [c for c in table.columns if re.fullmatch(r"emb_\d+", str(c))]
    if not cols:
        raise UserError(f"{path}: has no emb_0, emb_1, ... columns; expected main_predict.py --embeddings output.")
    values = table[cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
    return FeatureSet(name, path, values, table.drop(columns=cols).astype(str))


def read_labels(path: str | None, first: FeatureSet) -> tuple[pd.DataFrame, str]:
    """The label table (every cell text, index = line numbers) and its name for messages; without --labels, the
    row table of the first embedding file (it holds every column of the CSV main_predict.py read)."""
    if path is None:
        return first.ids, f"the row table of {first.source}"
    table = read_csv_table(path)
    if len(table) == 0:
        raise UserError(f"--labels {path}: has a header but no rows.")
    return table, path


def need_columns(table: pd.DataFrame, columns: list[str], what: str, flag: str) -> list[str]:
    """The table's names of `columns` (case-insensitive); one sentence naming the first that is missing."""
    found = []
    for c in columns:
        col = find_column(table, c)
        if col is None:
            raise UserError(f"{what}: has no column {c!r} ({flag}); its columns are "
                            f"{', '.join(map(str, table.columns))}.")
        found.append(col)
    return found


def row_keys(table: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """One text key per row from the id columns, cells stripped."""
    parts = [table[c].astype(str).str.strip() for c in columns]
    key = parts[0]
    for p in parts[1:]:
        key = key + KEY_SEP + p
    return key.to_numpy(dtype=object)


def check_unique(keys: np.ndarray, table: pd.DataFrame, what: str, columns: list[str]) -> None:
    dup = pd.Series(keys).duplicated().to_numpy()
    if dup.any():
        k = int(np.argmax(dup))
        raise UserError(f"{what}: {where(int(table.index[k]))} repeats the {'/'.join(columns)} "
                        f"{keys[k].replace(KEY_SEP, ', ')!r} of an earlier row; rows must be told apart: name more "
                        f"--id_columns (for lesions, e.g. Path coordX coordY coordZ).")


def align(fs: FeatureSet, keys: np.ndarray, id_columns: list[str], labels: pd.DataFrame,
          labels_what: str) -> np.ndarray:
    """Row index into fs.matrix for every label row (in label order); one sentence naming the first label row
    the embedding file lacks."""
    cols = need_columns(fs.ids, id_columns, fs.source, "--id_columns")
    theirs = row_keys(fs.ids, cols)
    check_unique(theirs, fs.ids, fs.source, id_columns)
    pos = pd.Index(theirs).get_indexer(keys)
    if (pos < 0).any():
        k = int(np.argmax(pos < 0))
        raise UserError(f"{fs.source}: has no row for {keys[k].replace(KEY_SEP, ', ')!r} ({labels_what}, "
                        f"{where(int(labels.index[k]))}; {int((pos < 0).sum())} of {len(keys)} label rows are "
                        f"missing); {'/'.join(id_columns)} values are compared as written: embed the table you label.")
    return pos


def gather(fs: FeatureSet, index: np.ndarray | None = None) -> np.ndarray:
    """float32 [n, D] of the rows `index` (all rows when None); one sentence naming the first row that holds NaN
    or infinity (a row main_predict.py failed on gives its error)."""
    x = np.asarray(fs.matrix[index] if index is not None else fs.matrix, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        k = int(np.argmax(bad))
        src = int(index[k]) if index is not None else k
        reason = ""
        if fs.ids is not None and "error" in fs.ids.columns and str(fs.ids["error"].iloc[src]).strip():
            reason = f" (main_predict.py: {str(fs.ids['error'].iloc[src]).strip()})"
        line = int(fs.ids.index[src]) if fs.ids is not None else src + 2
        raise UserError(f"{fs.source}: {where(line)} has no finite embedding{reason}; {int(bad.sum())} rows are "
                        f"affected: remove them from the label table or embed them again.")
    return x


def column_features(name: str, table: pd.DataFrame, columns: list[str], what: str) -> FeatureSet:
    """Columns of the label table as a feature set (a baseline such as diameter_mm); numbers required."""
    cols = need_columns(table, columns, what, "--columns")
    out = np.zeros((len(table), len(cols)), np.float32)
    for j, c in enumerate(cols):
        text = table[c].astype(str).str.strip()
        num = pd.to_numeric(text, errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(num)
        if bad.any():
            k = int(np.argmax(bad))
            got = "an empty cell" if text.iloc[k] == "" else repr(text.iloc[k])
            raise UserError(f"{what}: {where(int(table.index[k]))}, column '{c}' (--columns {name}): expected a "
                            f"number, got {got}.")
        out[:, j] = num
    return FeatureSet(name, f"columns {', '.join(cols)} of {what}", out)


def targets(table: pd.DataFrame, columns: list[str], task_name: str, what: str) -> tuple[np.ndarray, Task, list[str]]:
    """(y, task, names): class indices [n] with the class names (binary, multiclass), 0/1 [n, K] with the column
    names (multilabel), or values [n, K] with the column names (regression). --task auto (`task_name`): several
    columns are multi-label; one column of numbers with up to 20 integer values, or of text, is classification;
    other numbers are regression."""
    cols = need_columns(table, columns, what, "--label_columns")
    text = table[cols].astype(str).apply(lambda c: c.str.strip())
    empty = (text == "").to_numpy()
    if empty.any():
        r, c = np.argwhere(empty)[0]
        raise UserError(f"{what}: {where(int(table.index[r]))}, column '{cols[c]}': the label is empty; label every "
                        f"row or leave the row out.")
    num = text.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    numeric = np.isfinite(num).all(axis=0)
    if task_name == AUTO:
        classes = None  # a single column of classes: how many
        if numeric[0] and (num == np.round(num)).all() and len(np.unique(num)) <= MAX_CLASSES:
            classes = len(np.unique(num))
        elif not numeric[0]:
            classes = text[cols[0]].nunique()
        task = probe_task(classes, len(cols))
    else:
        task = task_named(task_name, PROBE_TASKS)
    if (task.continuous or task.multi_label) and not numeric.all():
        j = int(np.argmin(numeric))
        r = int(np.argmax(~np.isfinite(num[:, j])))
        raise UserError(f"{what}: {where(int(table.index[r]))}, column '{cols[j]}': expected a number for the "
                        f"{task.name} task, got {text.iloc[r, j]!r}.")
    if task.continuous:
        return num, task, cols
    if task.multi_label:
        bad = ~np.isin(num, (0, 1))
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise UserError(f"{what}: {where(int(table.index[r]))}, column '{cols[c]}': expected 0 or 1 for a "
                            f"multi-label task, got {text.iloc[r, c]!r}.")
        for j, c in enumerate(cols):
            if len(np.unique(num[:, j])) < 2:
                raise UserError(f"{what}: column '{c}' holds only {int(num[0, j])}; each label needs both values.")
        return num.astype(np.int64), task, cols
    if len(cols) > 1:
        raise UserError(f"--task {task.name} takes one --label_columns column, got {len(cols)}; use multilabel.")
    values = num[:, 0] if numeric[0] else text[cols[0]].to_numpy()
    classes = np.unique(values)
    names = [f"{c:g}" if numeric[0] else str(c) for c in classes]
    if len(classes) < 2 or (task.max_classes and len(classes) > task.max_classes):
        raise UserError(f"{what}: column '{cols[0]}' holds {len(classes)} distinct labels ({', '.join(names[:5])}); "
                        f"a {task.name} task needs {'two' if task.max_classes == 2 else 'at least two'}.")
    return np.searchsorted(classes, values).astype(np.int64), task, names
