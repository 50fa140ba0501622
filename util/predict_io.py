"""Input and output of `main_predict.py`: the input CSV, prediction/embedding tables, label maps.

Every output is written atomically (util.atomic), so an interrupted run never leaves a half-written file under
the final name.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pandas as pd
import SimpleITK as sitk

from util.atomic import atomic_write
from util.path_table import find_column, read_csv_table, resolve_paths
from util.metrics import classification_metrics
from util.tasks import output_columns, predicted_label

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gz")
EMBEDDING_SUFFIXES = (".npy", ".csv", ".parquet")


def read_input_table(csv_path: str) -> tuple[pd.DataFrame, list[str]]:
    """The input CSV exactly as written (all cells text) and the absolute volume path of every row.

    Read by util.path_table like every other table; relative paths resolve against the CSV's folder. Missing
    volumes and empty cells are not checked here: they become per-row errors during prediction.
    """
    df = read_csv_table(csv_path).reset_index(drop=True)
    col = find_column(df, "Path")
    if col is None:
        raise ValueError(f"--input_csv {csv_path} has no 'Path' column (columns: {', '.join(df.columns)}).")
    if len(df) == 0:
        raise ValueError(f"--input_csv {csv_path} has a header but no rows.")
    return df, resolve_paths(df, col, csv_path, check_exists=False)


def prediction_table(df: pd.DataFrame, results: dict[int, dict], meta: dict) -> pd.DataFrame:
    """Input columns, then `prob_<class>` columns and `pred` (or `pred_<label>` for regression, or `seg_path`
    for segmentation), then `error` (empty when the row succeeded). Rows stay in input order."""
    out = df.copy()
    mode, n = meta["mode"], len(df)
    if mode == "segmentation":
        out["seg_path"] = [results.get(i, {}).get("seg_path", "") for i in range(n)]
    elif mode != "embedding":
        names = output_columns(meta)
        values = np.full((n, len(names)), np.nan, dtype=np.float64)
        pred = [""] * n
        for i, r in results.items():
            if "probs" in r:
                values[i] = r["probs"]
                pred[i] = "" if mode == "regression" else predicted_label(mode, names, r["probs"])
        prefix = "pred_" if mode == "regression" else "prob_"
        for k, name in enumerate(names):
            out[f"{prefix}{name}"] = values[:, k]
        if mode != "regression":
            out["pred"] = pred
    out["error"] = [results.get(i, {}).get("error", "") or "" for i in range(n)]
    return out


def score_against_labels(df: pd.DataFrame, results: dict[int, dict], meta: dict, column: str) -> str | None:
    """One line scoring a classifier's predictions against a class-index column of the input (a held-out set's
    `Label`), over the rows that succeeded and hold a label; None when there is no such column or nothing to score
    (other heads, labels that are not class indices of this head)."""
    col = find_column(df, column)
    if meta["mode"] not in ("binary", "multiclass") or col is None:
        return None
    labels = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)
    rows = [i for i in sorted(results) if "probs" in results[i] and np.isfinite(labels[i])]
    if not rows:
        return None
    probs, y = np.stack([results[i]["probs"] for i in rows]), labels[rows]
    if (y != np.round(y)).any() or y.min() < 0 or y.max() >= probs.shape[1]:
        return None
    m = classification_metrics(probs, y.astype(np.int64), meta["mode"], output_columns(meta))
    return (f"Against the {col} column ({len(rows)} rows): accuracy {m['accuracy']:.3f}, balanced accuracy "
            f"{m['balanced_accuracy']:.3f}, AUROC {m['auroc']:.3f}")


def embedding_matrix(results: dict[int, dict], n: int, dim: int) -> np.ndarray:
    """float32 [n, dim] in input order; rows without an embedding (failed) are NaN."""
    emb = np.full((n, dim), np.nan, dtype=np.float32)
    for i, r in results.items():
        if "emb" in r:
            emb[i] = r["emb"]
    return emb


def row_identifiers(df: pd.DataFrame, results: dict[int, dict]) -> pd.DataFrame:
    """`row` (0-based position in the input CSV), every input column, and `error`."""
    ids = df.copy()
    ids.insert(0, "row", np.arange(len(df)))
    ids["error"] = [results.get(i, {}).get("error", "") or "" for i in range(len(df))]
    return ids


def check_embedding_path(path: str) -> None:
    """Refuse an unknown extension, or .parquet without pyarrow, before any work is done."""
    if not path.endswith(EMBEDDING_SUFFIXES):
        raise ValueError(f"--embeddings {path} must end in .npy, .csv or .parquet.")
    if path.endswith(".parquet") and importlib.util.find_spec("pyarrow") is None:
        raise ValueError(f"--embeddings {path}: writing .parquet needs pyarrow (pip install pyarrow); "
                         f"use .npy or .csv instead.")


def embedding_outputs(path: str) -> list[str]:
    """Files an --embeddings path produces (a .npy also gets a `<path>.rows.csv` sidecar)."""
    return [path, path + ".rows.csv"] if path.endswith(".npy") else [path]


def write_embeddings(path: str, df: pd.DataFrame, results: dict[int, dict], dim: int) -> None:
    """.npy: float32 [N, dim] plus `<path>.rows.csv`; .csv/.parquet: identifier columns + emb_0..emb_{dim-1}."""
    emb = embedding_matrix(results, len(df), dim)
    ids = row_identifiers(df, results)
    if path.endswith(".npy"):
        def save_npy(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, emb)
        atomic_write(path, save_npy)
        atomic_write(path + ".rows.csv", lambda tmp: ids.to_csv(tmp, index=False))
        return
    table = pd.concat([ids, pd.DataFrame(emb, columns=[f"emb_{k}" for k in range(dim)])], axis=1)
    if path.endswith(".parquet"):
        atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))
    else:
        atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.9g"))


def write_predictions(path: str, table: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.7g"))


def check_outputs(paths: list[str], overwrite: bool) -> None:
    """Refuse to replace existing outputs unless --overwrite; make sure their folders can be created."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]}{more} already exists; pass --overwrite to replace it, "
                              f"or choose another output path.")
    for p in paths:
        folder = os.path.dirname(os.path.abspath(p))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise OSError(f"Cannot create the output folder {folder} ({e.strerror or e}).") from None


def volume_stem(path: str) -> str:
    """'scans/ct_001.nii.gz' -> 'ct_001'; a DICOM folder gives its folder name."""
    name = os.path.basename(os.path.normpath(path)) or "volume"
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def seg_output_paths(paths: list[str], seg_dir: str) -> list[str]:
    """`<seg_dir>/<stem>_seg.nii.gz` per row; stems shared by several rows get `_row<k>` (1-based) appended."""
    stems = [volume_stem(p) for p in paths]
    counts = pd.Series(stems).value_counts()
    return [os.path.join(seg_dir, f"{s}_row{i + 1}_seg.nii.gz" if counts[s] > 1 else f"{s}_seg.nii.gz")
            for i, s in enumerate(stems)]


def grid_of(img: sitk.Image) -> dict:
    """The geometry of an image as plain tuples (cheap to send from DataLoader workers)."""
    return {"size": img.GetSize(), "spacing": img.GetSpacing(), "origin": img.GetOrigin(),
            "direction": img.GetDirection()}


def image_on_grid(grid: dict) -> sitk.Image:
    """An empty uint8 image with the geometry from `grid_of` (a resampling reference)."""
    img = sitk.Image([int(s) for s in grid["size"]], sitk.sitkUInt8)
    img.SetSpacing(grid["spacing"])
    img.SetOrigin(grid["origin"])
    img.SetDirection(grid["direction"])
    return img


def write_label_map(path: str, label: sitk.Image) -> None:
    """Write a label map (uint8, or uint16 above 255 classes) compressed, atomically."""
    atomic_write(path, lambda tmp: sitk.WriteImage(label, tmp, True))
