"""Outputs of `main_evaluate.py`: results.csv (one row per feature set, protocol, fraction and draw), summary.csv
and summary.md (means over draws with 95% bootstrap intervals and paired differences), label_efficiency.png,
and overlap.csv (evaluated scans found in pretraining data). Every file is written atomically.
"""
from __future__ import annotations

import os
import shlex
import sys

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from util.atomic import atomic_write, ensure_writable_dir, write_text
from util.errors import UserError

NAMES = {"auroc": "AUROC", "balanced_accuracy": "balanced accuracy", "r2": "R^2", "mae": "MAE"}
PROTOCOL_NAMES = {"logreg": "linear probe", "knn": "k-NN"}
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def output_paths(folder: str, with_overlap: bool) -> dict[str, str]:
    names = ["results.csv", "summary.csv", "summary.md", "label_efficiency.png"] + (["overlap.csv"] if with_overlap
                                                                                      else [])
    return {n: os.path.join(folder, n) for n in names}


def check_outputs(outputs: dict[str, str], overwrite: bool) -> None:
    """Before any work: the folder writable, and no earlier result replaced unless --overwrite."""
    existing = [p for p in outputs.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists (an earlier evaluation); pass --overwrite to replace "
                              f"it, or choose another --output_dir.")
    try:
        ensure_writable_dir(os.path.dirname(os.path.abspath(next(iter(outputs.values())))))
    except ValueError as e:  # util.atomic says it in one sentence; it is the user's folder
        raise UserError(str(e)) from None


def _ci(row, m: str) -> str:
    lo, hi = row.get(f"{m}_low", np.nan), row.get(f"{m}_high", np.nan)
    return f"{row[m]:.3f}" + ("" if not np.isfinite(lo) else f" [{lo:.3f}, {hi:.3f}]")


def _pct(f: float) -> str:
    return f"{f * 100:g}%"


def table_lines(summary: pd.DataFrame, task: str) -> list[str]:
    """The markdown table: one line per protocol, fraction and feature set."""
    primary = task.primary_metric
    head = ["probe", "labels", "features", *[f"{NAMES[m]} [95% CI]" for m in task.headline],
            f"difference in {NAMES[primary]} [95% CI]", "ahead in"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summary.iterrows():
        diff = "reference" if pd.isna(r.get(f"diff_{primary}", np.nan)) else \
            f"{r[f'diff_{primary}']:+.3f}" + ("" if not np.isfinite(r["diff_low"]) else
                                              f" [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]")
        ahead = r.get("ahead_in_draws", "")
        cells = [PROTOCOL_NAMES[r["protocol"]], f"{_pct(r['fraction'])} ({r['n_labelled']})", r["embedding"],
                 *[_ci(r, m) for m in task.headline], diff,
                 f"{ahead} draws" if isinstance(ahead, str) and ahead else ""]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def console_table(summary: pd.DataFrame, task: str) -> str:
    return "\n".join(table_lines(summary, task))


def summary_markdown(args, d: dict, summary: pd.DataFrame, hits: pd.DataFrame | None) -> str:
    """summary.md: what was compared and how, the table, the overlap check and the command."""
    n, task = len(d["y"]), d["task"]
    split = (f"the given split in column {args.split_column}" if args.split_column else
             f"{args.folds}-fold cross-validation" + (" stratified by class" if task.single_label
                                                      else "")
             + (f", grouped by {args.group_column} (no group in two folds)" if args.group_column else ""))
    unit = "patients (groups of " + args.group_column + ")" if args.group_column else "rows"
    metric = NAMES[task.primary_metric]
    boot = ("none (--bootstrap 0)" if not args.bootstrap else
            f"{args.bootstrap} bootstrap resamples of the {unit} (seed {args.seed}). In each resample every probe is "
            f"refitted on its resampled labelled rows (logistic regression and ridge: one Newton step from the "
            f"fitted weights, C and the standardisation kept; k-NN: its neighbours recounted among the resampled "
            f"copies) and scored on its resampled test rows; the interval is the central 95% of the resampled "
            f"values around their own mean, placed at the point. It covers the {metric} that this probe, trained "
            f"on a labelled set of the size in 'labels' drawn from the same population, reaches on new {unit}, "
            f"averaged over such training sets: test sampling and training variability both count. In simulations "
            f"(bench/bench_coverage.py: pure noise and Gaussian classes, 50 to 1,000 rows, balanced and 20% "
            f"positives, 100 data sets each) it held its target in 94-100% of the data sets; near chance level it "
            f"is conservative")
    lines = [
        "# Frozen-embedding evaluation", "",
        f"- Task: {task.name} on {', '.join(args.label_columns)} ({n} rows; classes/targets: {', '.join(d['names'])}).",
        "- Features: " + "; ".join(f"{k} ({v.shape[1]} dims)" for k, v in d["sets"].items()) + ".",
        f"- Evaluation: {split}; every row is predicted by a probe that never saw its label. A value is the mean "
        f"over folds and label draws of each fold's metric on its own test rows (so probes of different folds are "
        f"never ranked against each other).",
        f"- Labels: {', '.join(_pct(f) for f in sorted(set(args.label_fractions)))} of each training fold's labels "
        f"(per class, at least 2 each), {args.draws} nested draws below 100%; 'labels' gives the labelled rows per "
        f"fold.",
        "- Probes: features standardised with the training fold's statistics (its features, not its labels); "
        "linear probe = logistic regression with C chosen by inner 3-fold cross-validation on the labelled rows"
        + (f" (grouped by {args.group_column})" if args.group_column else "") + ", the C with the best mean "
        "held-out log-loss (ridge for regression); k-NN = Euclidean distance, "
        f"k = {args.knn_k}, distance-weighted votes. Predicted class: the largest probability over its share of "
        "the training labels.",
        f"- Intervals (95%): {boot}. Differences are paired (the same resamples) against {d['reference']}; "
        f"'ahead in' counts the draws in which a feature set beat it.", "",
        *table_lines(summary, task), ""]
    if hits is not None:
        lines += ["## Overlap with pretraining data", ""]
        for spec in args.pretraining:
            name = spec.partition("=")[0]
            h = hits[hits["embedding"] == name]
            n_path, n_content = (h.matched_by == "path").sum(), (h.matched_by == "content").sum()
            n_bad = (h.matched_by == "unreadable").sum()
            lines.append(f"- {name}: {n_path + n_content} of {n} evaluated scans were in its pretraining data"
                         + (f" ({n_path} by path, {n_content} by content); listed in overlap.csv. Results on them "
                            f"are not held out." if n_path + n_content else ".")
                         + (f" {n_bad} could not be read, so their content was not compared (overlap.csv lists "
                            f"them as unreadable)." if n_bad else ""))
        lines.append("")
    lines += ["Command:", "", "```", "python main_evaluate.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
              if sys.argv[0].endswith("main_evaluate.py") else "main_evaluate.py (called in-process)", "```", ""]
    return "\n".join(lines)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed size
        return ImageFont.load_default()


def curve_points(summary: pd.DataFrame) -> pd.DataFrame:
    """The rows the picture draws: one per probe, feature set and labelled-row count (fractions small enough to
    hit the 2-per-class floor label the same rows, so they are one point), sorted by that count."""
    s = summary.sort_values(["protocol", "embedding", "n_labelled", "fraction"], kind="stable")
    return s.drop_duplicates(["protocol", "embedding", "n_labelled"], keep="first")


def label_efficiency_png(summary: pd.DataFrame, task: str, path: str) -> None:
    """The primary metric against the labelled rows per training fold (log scale), one panel per probe, one line
    per feature set with its 95% interval as a band."""
    m = task.primary_metric
    protocols = list(dict.fromkeys(summary["protocol"]))
    sets = list(dict.fromkeys(summary["embedding"]))
    summary = curve_points(summary)
    pw, ph, left, top, bottom = 520, 380, 70, 50, 60
    img = Image.new("RGB", (pw * len(protocols), ph + 30 + 18 * len(sets)), "white")
    draw, font, small = ImageDraw.Draw(img, "RGBA"), _font(15), _font(12)
    lo_all = summary[[m, f"{m}_low"]].min().min()
    hi_all = summary[[m, f"{m}_high"]].max().max()
    ymin, ymax = (np.floor(lo_all * 20) / 20, np.ceil(hi_all * 20) / 20) if np.isfinite([lo_all, hi_all]).all() \
        else (0.0, 1.0)
    ymax = ymax if ymax > ymin else ymin + 0.05
    counts = sorted(summary["n_labelled"].unique())
    lx = np.log10(np.maximum(counts, 1))
    xmin, xmax = (lx.min() - 0.15, lx.max() + 0.15) if len(lx) > 1 else (lx[0] - 1, lx[0] + 1)
    for p, protocol in enumerate(protocols):
        x0, x1, y0, y1 = p * pw + left, (p + 1) * pw - 20, top, ph - bottom

        def xy(n, v):
            return (x0 + (np.log10(max(n, 1)) - xmin) / (xmax - xmin) * (x1 - x0),
                    y1 - (v - ymin) / (ymax - ymin) * (y1 - y0))
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, 15), f"{PROTOCOL_NAMES[protocol]}: {NAMES[m]} (95% CI)", fill="black", font=font)
        for n in counts:
            x = xy(n, ymin)[0]
            draw.line([x, y1, x, y1 + 5], fill="black")
            draw.text((x - 4 * len(str(n)), y1 + 8), str(n), fill="black", font=small)
        step = next(s for s in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0) if (ymax - ymin) / s <= 8) \
            if ymax - ymin <= 80 else (ymax - ymin) / 5
        for v in np.arange(np.ceil(ymin / step) * step, ymax + step / 2, step):
            y = xy(counts[0], v)[1]
            draw.line([x0 - 5, y, x0, y], fill="black")
            draw.text((x0 - 45, y - 7), f"{v:.2f}", fill="black", font=small)
        draw.text((x0 + (x1 - x0) / 2 - 110, y1 + 28), "labelled rows per training fold (log)", fill="black",
                  font=small)
        for k, name in enumerate(sets):
            s = summary[(summary.protocol == protocol) & (summary.embedding == name)]
            c = COLOURS[k % len(COLOURS)]
            if s[f"{m}_low"].notna().all() and len(s) > 1:
                band = [xy(n, v) for n, v in zip(s.n_labelled, s[f"{m}_high"])] + \
                       [xy(n, v) for n, v in zip(s.n_labelled[::-1], s[f"{m}_low"][::-1])]
                draw.polygon(band, fill=(*c, 50))
            pts = [xy(n, v) for n, v in zip(s.n_labelled, s[m])]
            if len(pts) > 1:
                draw.line(pts, fill=c, width=3)
            for x, y in pts:
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=c)
    for k, name in enumerate(sets):
        y = ph + 10 + 18 * k
        c = COLOURS[k % len(COLOURS)]
        draw.line([left, y + 7, left + 30, y + 7], fill=c, width=3)
        draw.text((left + 38, y), name, fill="black", font=small)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def write_all(outputs: dict[str, str], results: pd.DataFrame, summary: pd.DataFrame, text: str,
              hits: pd.DataFrame | None, task: str) -> None:
    atomic_write(outputs["results.csv"], lambda tmp: results.to_csv(tmp, index=False, float_format="%.6g"))
    atomic_write(outputs["summary.csv"], lambda tmp: summary.to_csv(tmp, index=False, float_format="%.6g"))
    write_text(outputs["summary.md"], text)
    label_efficiency_png(summary, task, outputs["label_efficiency.png"])
    if hits is not None:
        atomic_write(outputs["overlap.csv"], lambda tmp: hits.to_csv(tmp, index=False))
