"""Prediction's engine (`main_predict.py`): rows of the input CSV read and preprocessed (PredictDataset), the model's
passes (predict_batch: probabilities and embeddings; segment_volume: sliding windows back onto the scan's grid),
and the outputs: prediction and embedding tables, label maps, scores against Label and Mask columns.

Every output is written atomically (util.atomic), so an interrupted run never leaves a half-written file under
the final name.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pandas as pd
import SimpleITK as sitk

import torch
from torch.utils.data import Dataset

from util.atomic import atomic_write, ensure_writable_dir
from util.data.augment import center_crop_or_pad
from util.data.input_dump import save_input
from util.volume.cache import VolumeCache
from util.errors import UserError
from util.run_folder import seg_output_name
from util.data.path_table import find_column, resolve_paths
from util.task.dice import dice_per_class
from util.runtime import autocast
from util.data.predict_table import read_input_table, read_table, row_inputs, row_rois, shard_rows  # noqa: F401
from util.volume.channels import load_row, preprocess_channels, read_channel
from util.volume.preprocess import preprocess_image, preprocess_mask, to_input_grid
from util.volume.io import VolumeError, read_image

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gz")
EMBEDDING_SUFFIXES = (".npy", ".csv", ".parquet")


class PredictDataset(Dataset):
    """One input row per item, read and preprocessed exactly as in training; never raises.

    Items are dicts: `row` (position in the CSV), `image` float32 [C, D, H, W] (None when the row failed), `error`
    (one sentence or None) and, with keep_grid, the geometry of the preprocessed grid (`ref`) and of the input
    image (`orig`, the first channel's) to put a label map back on the input grid. `sources`: per row its
    ChannelSource tuple (several channels), else None.
    """

    def __init__(self, paths: list[str], rows: list[int], cfg, crop_size: tuple[int, int, int] | None,
                 keep_grid: bool = False, cache_dir: str | None = None, rois: list | None = None,
                 save_inputs: str | None = None, sources: list | None = None):
        self.paths, self.rows, self.cfg, self.rois, self.sources = paths, rows, cfg, rois, sources
        self.crop_size, self.keep_grid, self.save_inputs = crop_size, keep_grid, save_inputs
        self.cache = VolumeCache(cache_dir) if cache_dir and not keep_grid else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> dict:
        row = self.rows[j]
        path = self.paths[row]
        try:
            roi = None if self.rois is None else self.rois[row]
            item = {"row": row, "error": None, **self._load(path, roi, row)}
            if self.save_inputs:  # what the model is fed, for a person to look at (util.data.input_dump)
                save_input(self.save_inputs, row + 1, path, item["image"].numpy(), self.cfg, roi,
                           image_on_grid(item["ref"]) if "ref" in item else None)
            return item
        except Exception as e:  # a bad row must never stop the batch or kill a worker
            return {"row": row, "error": row_error(path, e), "image": None}

    def _load(self, path: str, roi, row: int) -> dict:
        sources = None if self.sources is None else self.sources[row]
        if not path or (sources is not None and not all(s.path for s in sources)):
            raise VolumeError("The Path cell is empty." if sources is None else
                              f"A channel cell is empty (channels {','.join(self.cfg.channel_names)}).")
        if self.keep_grid:  # segmentation: whole preprocessed volume + both grids
            if sources is None:
                img = read_image(path)
                arr, ref = preprocess_image(img, self.cfg, name=path)
            else:
                (arr, ref), img = preprocess_channels(sources, self.cfg), read_channel(sources[0])
            return {"image": as_input(arr), "ref": grid_of(ref), "orig": grid_of(img)}
        arr = load_row(path if sources is None else sources, self.cfg, self.cache, roi=roi)[0]  # ROI: the row's box
        if tuple(arr.shape[-3:]) != tuple(self.crop_size):  # as the finetuning eval crop
            arr = center_crop_or_pad(arr, self.crop_size, 0.0)
        return {"image": as_input(arr)}


def as_input(arr: np.ndarray) -> torch.Tensor:
    """float32 [C, D, H, W] of a preprocessed [D, H, W] (one channel) or [C, D, H, W] array."""
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return x[None] if x.dim() == 3 else x


def row_error(path: str, e: Exception) -> str:
    """One sentence naming the file: loader errors already do; anything else gets the path and the type."""
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, UserError) and path and msg.startswith(path):
        return msg
    return f"{path or '(empty path)'}: {msg if isinstance(e, UserError) else f'{type(e).__name__}: {msg}'}"


def collate_rows(items: list[dict]) -> dict:
    """Separate good rows (stacked images [B, 1, D, H, W], or a list for segmentation) from failed ones."""
    good = [it for it in items if it["error"] is None]
    batch = {"rows": [it["row"] for it in good], "failed": [(it["row"], it["error"]) for it in items
                                                            if it["error"] is not None]}
    if good and "ref" in good[0]:
        batch["images"] = [it["image"] for it in good]
        batch["grids"] = [(it["ref"], it["orig"]) for it in good]
    else:
        batch["images"] = torch.stack([it["image"] for it in good]) if good else None
    return batch


def prediction_table(df: pd.DataFrame, results: dict[int, dict], meta) -> pd.DataFrame:
    """Input columns, then `prob_<class>` columns and `pred` (or `pred_<label>` for regression, or `seg_path`
    and, when the input has a Mask column, `dice` for segmentation), then `error` (empty when the row
    succeeded). Rows stay in input order. `meta`: the checkpoint's RunMeta (util.task.meta)."""
    out = df.copy()
    task, n = meta.task, len(df)
    if task.dense:
        out["seg_path"] = [results.get(i, {}).get("seg_path", "") for i in range(n)]
        if find_column(df, "Mask") is not None:  # the label maps scored against the input's masks
            out["dice"] = [results.get(i, {}).get("dice", np.nan) for i in range(n)]
    elif not task.headless:
        names = meta.output_columns
        values = np.full((n, len(names)), np.nan, dtype=np.float64)
        pred = [""] * n
        for i, r in results.items():
            if "probs" in r:
                values[i] = r["probs"]
                pred[i] = "" if task.continuous else task.predicted_label(names, r["probs"])
        for k, name in enumerate(names):
            out[f"{task.value_prefix}{name}"] = values[:, k]
        if not task.continuous:  # values have no predicted class
            out["pred"] = pred
    out["error"] = [results.get(i, {}).get("error", "") or "" for i in range(n)]
    return out


def score_against_labels(df: pd.DataFrame, results: dict[int, dict], meta, column: str) -> str | None:
    """One line scoring a classifier's predictions against a class-index column of the input (a held-out set's
    `Label`), over the rows that succeeded and hold a label; None when there is no such column or nothing to score
    (other heads, labels that are not class indices of this head)."""
    col = find_column(df, column)
    if not meta.task.single_label or col is None:
        return None
    labels = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)
    rows = [i for i in sorted(results) if "probs" in results[i] and np.isfinite(labels[i])]
    if not rows:
        return None
    probs, y = np.stack([results[i]["probs"] for i in rows]), labels[rows]
    if (y != np.round(y)).any() or y.min() < 0 or y.max() >= probs.shape[1]:
        return None
    m = meta.task.probability_metrics(probs, y.astype(np.int64), meta.output_columns)
    return (f"Against the {col} column ({len(rows)} rows): accuracy {m['accuracy']:.3f}, balanced accuracy "
            f"{m['balanced_accuracy']:.3f}, AUROC {m['auroc']:.3f}")


def mask_paths(df: pd.DataFrame, csv_path: str) -> list[str] | None:
    """The absolute label-map path of every row when the input has a `Mask` column (empty cells give ""), else
    None."""
    col = find_column(df, "Mask")
    return None if col is None else resolve_paths(df, col, csv_path, check_exists=False)


def mask_dice(label: sitk.Image, mask_path: str, nb_classes: int) -> float:
    """Mean Dice over the foreground classes of a predicted label map (on its input image's grid) against the
    row's Mask file, brought onto that grid like a training mask; nan when neither holds any foreground.
    Raises VolumeError (or OSError) naming the file when the mask cannot be read or compared."""
    if not mask_path:
        raise VolumeError("the Mask cell is empty.")
    mask = preprocess_mask(read_image(mask_path), label, mask_path)
    if mask.min() < 0:
        raise VolumeError(f"{mask_path}: holds negative labels; expected 0 (background) to K-1.")
    k = max(int(nb_classes), int(mask.max()) + 1)  # a class the model cannot predict counts as missed
    return dice_per_class(sitk.GetArrayViewFromImage(label).astype(np.int64), mask, k)["dice"]


def score_against_masks(df: pd.DataFrame, results: dict[int, dict]) -> list[str]:
    """Lines summing up Dice against the input's Mask column: the mean over the rows scored, and the rows whose
    mask could not be scored (first reason); [] without a Mask column."""
    if find_column(df, "Mask") is None:
        return []
    dice = [r["dice"] for r in results.values() if "dice" in r and np.isfinite(r["dice"])]
    lines = [f"Against the Mask column ({len(dice)} rows): mean Dice {np.mean(dice):.3f} (per row in the dice "
             f"column)."] if dice else []
    bad = sorted(i for i, r in results.items() if "dice_error" in r)
    if bad:
        lines.append(f"Dice not computed for {len(bad)} rows; first: row {bad[0] + 1}: {results[bad[0]]['dice_error']}")
    return lines


def embedding_matrix(results: dict[int, dict], n: int, dim: int) -> np.ndarray:
    """float32 [n, dim] in input order; rows without an embedding (failed) are NaN."""
    emb = np.full((n, dim), np.nan, dtype=np.float32)
    for i, r in results.items():
        if "emb" in r:
            emb[i] = r["emb"]
    return emb


def row_identifiers(df: pd.DataFrame, results: dict[int, dict]) -> pd.DataFrame:
    """`row` (the input CSV's data row, counted from 1 under the header as every message counts rows), every input
    column, and `error`."""
    ids = df.copy()
    ids.insert(0, "row", np.arange(1, len(df) + 1))
    ids["error"] = [results.get(i, {}).get("error", "") or "" for i in range(len(df))]
    return ids


def check_embedding_path(path: str) -> None:
    """Refuse an unknown extension, or .parquet without pyarrow, before any work is done."""
    if not path.endswith(EMBEDDING_SUFFIXES):
        raise UserError(f"--embeddings {path} must end in .npy, .csv or .parquet.")
    if path.endswith(".parquet") and importlib.util.find_spec("pyarrow") is None:
        raise UserError(f"--embeddings {path}: writing .parquet needs pyarrow (pip install pyarrow); "
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


def output_files(output_csv: str | None, embeddings: str | None, seg_paths=()) -> list[tuple[str, str]]:
    """(file, the flag that makes it) of every output of a run."""
    named = [(output_csv, "--output_csv")] if output_csv else []
    named += [(p, "--embeddings") for p in (embedding_outputs(embeddings) if embeddings else [])]
    return named + [(p, "--seg_output_dir") for p in seg_paths]


def check_outputs(outputs: list[tuple[str, str]], overwrite: bool, inputs: dict[str, str] | None = None) -> None:
    """Before any work: every output (`(path, flag that makes it)`) a different file and none of them an input
    (`{what: path}`); none existing unless --overwrite; every output folder created and writable."""
    owner: dict[str, str] = {}
    for what, path in (inputs or {}).items():
        if path:
            owner.setdefault(os.path.realpath(path), what)
    for path, flag in outputs:
        real = os.path.realpath(path)
        if real in owner:
            kind = "an input" if owner[real] in (inputs or {}) else "another output"
            raise UserError(f"{flag} {path} is the same file as {owner[real]} ({kind} of this run); choose "
                            f"another path, so that nothing is overwritten.")
        owner[real] = flag
    existing = [p for p, _ in outputs if os.path.exists(p)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]}{more} already exists; pass --overwrite to replace it, "
                              f"or choose another output path.")
    folders = {os.path.dirname(os.path.abspath(p)): flag for p, flag in outputs}
    for folder, flag in folders.items():
        ensure_writable_dir(folder, f"The folder of {flag}")


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
    return [os.path.join(seg_dir, seg_output_name(s, i + 1 if counts[s] > 1 else None)) for i, s in enumerate(stems)]


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


@torch.inference_mode()
def predict_batch(model, images: torch.Tensor, task, device: str, precision: str, pool: str | None) -> list[dict]:
    """images [B, C, D, H, W] -> one result dict per volume: `probs` [K] (a model with a head) and/or, with `pool`
    (models_vit3d.pool_tokens: 'token', 'avg', 'cat'), the embedding `emb` [F] (numpy float32)."""
    from models_vit3d import pool_tokens

    x = images.to(device, non_blocking=True)
    emb, logits = None, None
    with autocast(precision, device):
        if pool:
            tokens = model.forward_features(x)
            emb = pool_tokens(tokens.float(), pool).cpu().numpy()
            if not task.headless:
                logits = model.forward_head(tokens)
        else:
            logits = model(x)
    probs = task.probabilities(logits).cpu().numpy() if logits is not None else None
    out = [{} for _ in range(len(x))]
    for b, r in enumerate(out):
        if probs is not None:
            r["probs"] = probs[b]
        if emb is not None:
            r["emb"] = emb[b]
    return out


@torch.inference_mode()
def segment_volume(model, image: torch.Tensor, grids: tuple[dict, dict], meta, device: str, precision: str,
                   sw_batch_size: int, overlap: float) -> sitk.Image:
    """image [C, D, H, W] in the preprocessed grid -> label map on the input image's own grid (sliding windows of
    the model's input size, Gaussian-weighted)."""
    from monai.inferers import sliding_window_inference

    x = image[None].to(device, non_blocking=True)
    k = meta.nb_classes
    stitch = "cpu" if k * x.numel() * 4 > 2 ** 32 else device  # keep huge logit volumes off the GPU
    with autocast(precision, device):
        logits = sliding_window_inference(x, roi_size=meta.input_size, sw_batch_size=sw_batch_size,
                                          predictor=lambda t: model(t).float(), overlap=overlap, mode="gaussian",
                                          device=stitch)
    label = logits.argmax(1)[0].cpu().numpy().astype(np.uint8 if k <= 256 else np.uint16)
    ref, orig = grids
    return to_input_grid(label, image_on_grid(ref), image_on_grid(orig))


def score_mask(label, row: int, masks: list[str] | None, meta) -> dict:
    """{'dice': foreground Dice against the row's Mask file}, {'dice_error': why}, or {} without a Mask column."""
    if masks is None:
        return {}
    try:
        return {"dice": mask_dice(label, masks[row], meta.nb_classes)}
    except (UserError, OSError, RuntimeError) as e:  # an unreadable mask never stops the prediction
        return {"dice_error": row_error(masks[row], e)}
