"""The one reader of the scripts' input tables: CSV/TSV files with a `Path` column, or plain lists of paths.

Encoding (UTF-8 with or without BOM, else Windows-1252 as Excel writes it) and delimiter (comma, semicolon,
tab) are detected; header names are stripped of spaces; every cell is read as text (an empty cell stays "").
Errors are one sentence naming the file, the row (data rows count from 1 under the header) and the column.
"""
from __future__ import annotations

import csv
import io
import os
import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from util.errors import UserError

PATH_COLUMNS = ("Path", "Mask")
DELIMITERS = (",", ";", "\t", "|")


class MissingFileError(UserError, FileNotFoundError):
    """A table, or a file a table names, that does not exist (an OSError too, for callers that catch those)."""


def where(line: int) -> str:
    """'row R (line L)': R counts data rows from 1 under the header, L is the line in the file."""
    return f"row {line - 1} (line {line})"


def _decode(data_path: str) -> tuple[str, str]:
    with open(data_path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as e:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            raise UserError(f"{data_path}: is neither UTF-8 nor Windows-1252 text (byte {raw[e.start]:#x} at "
                             f"offset {e.start}); save it as UTF-8 CSV.") from None
        warnings.warn(f"{data_path}: is not UTF-8; read it as Windows-1252 (Excel's CSV encoding).")
        return text, "cp1252"


LIST_EXTENSIONS = (".txt", ".lst", ".list")  # always one path per line (a path may hold ',' or ';')


def _delimiter(data_path: str, header: str) -> str | None:
    """The header's delimiter, or None for a one-column file (a plain list of paths)."""
    if data_path.lower().endswith(".tsv"):
        return "\t"
    if data_path.lower().endswith(LIST_EXTENSIONS):
        return None
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def read_csv_table(data_path: str | os.PathLike) -> pd.DataFrame:
    """A table exactly as written: all cells text, header names stripped, fully empty rows dropped.

    The index holds each row's 1-based line number in the file (the header is line 1). A file without a
    header `Path` (a plain list, one path per line, `#` comments allowed) becomes a one-column `Path` table.
    """
    data_path = os.path.abspath(os.fspath(data_path))
    if not os.path.isfile(data_path):
        raise MissingFileError(f"{data_path}: table not found; expected a CSV with a 'Path' column.")
    text, _ = _decode(data_path)
    lines = text.splitlines()
    first = next((s for s in lines if s.strip()), "")
    if not first:
        raise UserError(f"{data_path}: is empty; expected a CSV with a 'Path' column (or one path per line).")
    sep = _delimiter(data_path, first)
    if sep is None and first.strip().lower() != "path":  # a plain list of paths
        rows = [(i, s.strip()) for i, s in enumerate(lines, 1) if s.strip() and not s.lstrip().startswith("#")]
        return pd.DataFrame({"Path": [p for _, p in rows]}, index=pd.Index([i for i, _ in rows], name="line"))
    _check_widths(data_path, text, sep or ",")
    try:  # index_col=False: a row with more fields than the header never turns its first column into the index
        with warnings.catch_warnings():  # the fields it drops were checked empty above
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            df = pd.read_csv(io.StringIO(text), sep=sep or ",", dtype=str, keep_default_na=False,
                             skip_blank_lines=False, quoting=csv.QUOTE_MINIMAL, index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        msg = " ".join(str(e).split())
        raise UserError(f"{data_path}: is not a readable {sep!r}-delimited table ({msg}).") from None
    df.columns = [str(c).strip() for c in df.columns]
    df.index = pd.RangeIndex(2, len(df) + 2, name="line")
    empty = (df.apply(lambda c: c.str.strip()) == "").all(axis=1) if len(df.columns) else []
    return df[~np.asarray(empty, bool)] if len(df) else df


def _check_widths(data_path: str, text: str, sep: str) -> None:
    """Rows longer than the header: trailing empty fields (`path,1,` as some exporters write) are ignored; a
    filled cell beyond the last header column is refused, naming the row (it belongs to no column)."""
    rows = csv.reader(io.StringIO(text), delimiter=sep)
    header = next(rows, [])
    for fields in rows:
        extra = [f for f in fields[len(header):] if f.strip()]
        if extra:
            raise UserError(f"{data_path}: {where(rows.line_num)} has {len(fields)} fields but the header has "
                            f"{len(header)} ({extra[0]!r} is under no column); remove it or name its column.")


def find_column(df: pd.DataFrame, name: str) -> str | None:
    """The column called `name`, matched case-insensitively (`path` works for `Path`); None when absent."""
    if name in df.columns:
        return name
    return next((c for c in df.columns if c.lower() == name.lower()), None)


def resolve_paths(df: pd.DataFrame, column: str, data_path: str, check_exists: bool = True) -> list[str]:
    """Absolute paths of one column: `~` expanded, relative paths resolved against the table's folder.

    check_exists=True: an empty cell or a missing file raises one sentence naming the row; False: empty
    cells give "" and nothing is checked (prediction reports such rows in their `error` column).
    """
    data_path = os.path.abspath(os.fspath(data_path))
    folder, out = os.path.dirname(data_path), []
    for line, value in df[column].items():
        value = str(value).strip()
        if not value:
            if check_exists:
                raise UserError(f"{data_path}: {where(int(line))} has an empty '{column}' value; expected a file path.")
            out.append("")
            continue
        p = os.path.expanduser(value)
        out.append(os.path.normpath(p if os.path.isabs(p) else os.path.join(folder, p)))
    if check_exists:
        gone = [(line, p) for line, p in zip(df.index, out) if not os.path.exists(p)]
        if gone:
            more = f" (and {len(gone) - 1} more rows)" if len(gone) > 1 else ""
            raise MissingFileError(f"{data_path}: {where(int(gone[0][0]))}, column {column}: {gone[0][1]} does not "
                                    f"exist{more}; relative paths are resolved against the file's folder.")
    return out


def read_path_table(data_path: str | os.PathLike, required: Sequence[str] = ("Path",),
                    check_exists: bool = True, unique_paths: bool = True) -> pd.DataFrame:
    """`read_csv_table` checked for `required` columns, with its Path (and Mask) columns resolved to existing
    absolute paths (`path` / `mask` headers are renamed to Path / Mask) and numeric columns as numbers (an empty
    cell is NaN there; columns with text stay text). check_exists=False: missing files and empty cells are left
    for the reader to report (training with --skip_bad skips and lists them). unique_paths=False: rows may share a
    scan (several lesions of one CT) without a warning."""
    data_path = os.path.abspath(os.fspath(data_path))
    df = read_csv_table(data_path)
    df = df.rename(columns={find_column(df, c): c for c in PATH_COLUMNS if find_column(df, c)})
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{data_path}: has no '{missing[0]}' column (columns: {', '.join(map(str, df.columns))}); "
                         f"expected a header row with {', '.join(required)}.")
    if len(df) == 0:
        raise UserError(f"{data_path}: has no data rows; expected one row per volume.")
    for col in [c for c in PATH_COLUMNS if c in required]:
        df[col] = resolve_paths(df, col, data_path, check_exists)
    for col in [c for c in df.columns if c not in PATH_COLUMNS]:  # numeric columns as numbers, empty cells NaN
        text = df[col].str.strip()
        num = pd.to_numeric(text.replace("", np.nan), errors="coerce")
        if num.notna().sum() == (text != "").sum():
            df[col] = num
    dup = df["Path"].duplicated() if "Path" in df.columns else pd.Series(False, index=df.index)
    if unique_paths and dup.any():
        warnings.warn(f"{data_path}: {int(dup.sum())} duplicated paths (first: {df['Path'][dup].iloc[0]}).")
    return df


def numeric_columns(df: pd.DataFrame, columns: Sequence[str], data_path: str, kind: str) -> np.ndarray:
    """Label columns -> float64 [N, K]; kind 'class' (integers >= 0), 'binary' (values in [0, 1]) or 'float'.

    Raises UserError naming the table, the row and the column of the first bad or empty cell.
    """
    out = np.zeros((len(df), len(columns)), np.float64)
    expect = {"class": "a class index 0, 1, 2, ...", "binary": "a number in [0, 1]", "float": "a number"}[kind]
    for j, col in enumerate(columns):
        text = df[col].astype(str).str.strip().where(df[col].notna(), "")
        num = pd.to_numeric(text, errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(num)
        if kind == "class":
            bad |= (num < 0) | (num != np.round(num))
        elif kind == "binary":
            bad |= (num < 0) | (num > 1)
        if bad.any():
            k = int(np.argmax(bad))
            got = "an empty cell" if text.iloc[k] == "" else repr(text.iloc[k])
            raise UserError(f"{data_path}: {where(int(df.index[k]))}, column '{col}': expected {expect}, got {got}.")
        out[:, j] = num
    return out


COORD_COLUMNS = ("coordX", "coordY", "coordZ")


def roi_points(df: pd.DataFrame, data_path: str, check: bool = True) -> list[tuple[float, float, float]]:
    """Per row, the point (x, y, z) in mm of its coordX, coordY, coordZ columns (names matched case-insensitively).

    A missing column is refused naming the table; check=True: a cell that is not a number names the row and the
    column; check=False: such a point holds NaN and its row fails when read (prediction's error column)."""
    cols = [find_column(df, c) for c in COORD_COLUMNS]
    if None in cols:
        missing = COORD_COLUMNS[cols.index(None)]
        raise UserError(f"{data_path}: has no '{missing}' column (columns: {', '.join(map(str, df.columns))}); "
                        f"--roi_mm centres each box on the point coordX, coordY, coordZ (mm) of its row, or on a "
                        f"label of its Mask with --roi_label L.")
    if check:
        xyz = numeric_columns(df, cols, data_path, "float")
    else:
        xyz = np.stack([pd.to_numeric(df[c].astype(str).str.strip(), errors="coerce").to_numpy(np.float64)
                        for c in cols], axis=1)
    return [(float(x), float(y), float(z)) for x, y, z in xyz]
