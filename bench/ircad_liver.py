"""Real-data segmentation check: liver Dice on 3D-IRCADb-01 patient 1, on slabs of the CT held out from training.

There is one labelled CT (../shared/data/ircadb01: 512x512x129 voxels, 0.57x0.57x1.6 mm, hand-drawn liver mask
on slices 27..124), so the held-out data are axial slabs of the same CT. The volume is cut into slabs of
--slab_slices slices (default 20 = 32 mm), with --gap_slices slices (default 4 = 6.4 mm) dropped between
neighbouring slabs so that no held-out slice is the direct neighbour of a training slice, and the slabs are dealt
alternately to two parts:

    even: slices 0-19, 48-67, 96-115     48% of the liver voxels (and the abdomen below the liver)
    odd : slices 24-43, 72-91, 120-128   35% of the liver voxels (and the dome / lung bases)
    gaps: 17% of the liver voxels, used by neither part

Interleaving (rather than cutting the liver in a cranial and a caudal half, `--split halves`) gives both parts the
same mix of anatomy: upper and lower liver, kidneys and bowel below it, heart and lungs above it. With halves,
a model trained on the cranial half has never seen the kidneys, bowel and lower abdomen that fill the caudal half
and labels much of them liver (one such run: fit Dice 0.86, held-out Dice 0.33 with 80% of the held-out liver
found but four times as many voxels called liver), which says more about the split than about the model.

Each slab is written as its own NIfTI image + binary liver mask (SimpleITK slicing keeps the physical geometry);
a part is a CSV listing its slabs. A fold trains on one part and validates on the other; the default runs both
folds (2-fold: every kept liver voxel is held out once). Per fold it reports, through the user-facing scripts
(commands printed):

  * held-out Dice: the other part, sliding-window inference on each slab, voxels summed over slabs, on the
    training grid (what main_finetune.py logs each epoch), at the LAST epoch (no checkpoint is chosen on the
    held-out part) and at the best epoch (optimistic: chosen on that same part);
  * held-out Dice on the native grid: `main_predict.py` writes the label maps back on the original
    0.57x0.57x1.6 mm grid and they are compared with the hand-drawn mask (last checkpoint);
  * fit Dice: the training part itself, last checkpoint (`main_finetune.py --eval`).

The training CSV lists its slabs about --repeat times in all: every row is a different random crop
(foreground-centred with probability --fg_prob) with random flips, so one "epoch" is ~--repeat crops. Training
is from scratch (no --finetune) unless --pretrain_epochs > 0, which first pretrains a tiny MAE (main_pretrain.py)
on the training part's CT slabs and the TotalSegmentator example CTs (never on the held-out part) and finetunes
from it. On a CPU shared by other jobs, OMP_NUM_THREADS=1 is several times faster than 2.

    OMP_NUM_THREADS=1 python bench/ircad_liver.py           # full run, both folds (~25 min on 2 CPU cores)
    OMP_NUM_THREADS=1 python bench/ircad_liver.py --quick   # smoke test (< 1 min)
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser("IRCAD liver segmentation benchmark")
    p.add_argument("--data_dir", default=str(DATA), help="folder holding ircadb01/ (and totalseg/ for pretraining)")
    p.add_argument("--work_dir", default="output_dir/ircad_liver")
    p.add_argument("--split", default="interleaved", choices=["interleaved", "halves"],
                   help="interleaved: alternate axial slabs (parts 'even', 'odd'); halves: the caudal and cranial "
                        "half of the liver's z-extent (parts 'caudal', 'cranial')")
    p.add_argument("--slab_slices", type=int, default=20, help="interleaved: slices per slab")
    p.add_argument("--gap_slices", type=int, default=4, help="slices dropped between slabs of different parts")
    p.add_argument("--folds", nargs="+", default=None,
                   help="training part(s), each validated on the other part (default: both, i.e. 2-fold)")
    p.add_argument("--model", default="vit_tiny_patch16")
    p.add_argument("--spacing", type=float, nargs=3, default=[1.6, 3.0, 3.0], help="D H W mm (1.6 = native slices)")
    p.add_argument("--input_size", type=int, nargs=3, default=[16, 64, 64])
    p.add_argument("--patch_size", type=int, nargs="+", default=[16])
    p.add_argument("--window", type=float, nargs=2, default=[-200.0, 300.0])
    p.add_argument("--feature_size", type=int, default=8, help="UNETR decoder width (16 costs 2.5x on a CPU)")
    p.add_argument("--epochs", type=int, default=36)
    p.add_argument("--warmup_epochs", type=int, default=2)
    p.add_argument("--repeat", type=int, default=32, help="random crops of the training part per epoch (CSV rows)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="absolute AdamW lr (scratch: layer decay 1.0)")
    p.add_argument("--layer_decay", type=float, default=1.0)
    p.add_argument("--drop_path", type=float, default=0.0)
    p.add_argument("--fg_prob", type=float, default=0.5)
    p.add_argument("--sw_overlap", type=float, default=0.5)
    p.add_argument("--pretrain_epochs", type=int, default=0, help="> 0: MAE-pretrain first and finetune from it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="one fold, 2 epochs, tiny crops (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.folds = args.folds or (["cranial"] if args.split == "halves" else ["even"])
        args.epochs, args.warmup_epochs, args.repeat, args.batch_size = 2, 0, 2, 2
        args.spacing, args.input_size, args.num_workers = [3.2, 6.0, 6.0], [16, 32, 32], 0
        args.pretrain_epochs = min(args.pretrain_epochs, 1)
    return args


# ------------------------------------------------------------------------------------------------ data
def write_atomic(img, path: Path) -> None:
    import SimpleITK as sitk

    from util.atomic import atomic_write

    atomic_write(path, lambda tmp: sitk.WriteImage(img, tmp, True))


def split_slices(mask_zyx: np.ndarray, split: str, slab: int, gap: int) -> dict[str, list[tuple[int, int]]]:
    """Slice ranges [lo, hi) of the slabs of each part: {'even': [...], 'odd': [...]} or {'caudal', 'cranial'}."""
    n = mask_zyx.shape[0]
    z = np.flatnonzero(mask_zyx.reshape(n, -1).any(1))
    if z.size == 0:
        raise SystemExit("the liver mask is empty.")
    if split == "halves":  # cut at the middle of the liver's z-extent
        cut = (int(z[0]) + int(z[-1]) + 1) // 2
        return {"caudal": [(0, cut - gap // 2)], "cranial": [(cut + gap - gap // 2, n)]}
    parts: dict[str, list[tuple[int, int]]] = {"even": [], "odd": []}
    for k, lo in enumerate(range(0, n, slab + gap)):
        parts["even" if k % 2 == 0 else "odd"].append((lo, min(lo + slab, n)))
    return parts


def prepare(args) -> dict:
    """Write every slab (image + binary liver mask) and each part's CSVs; returns {part: facts}."""
    import SimpleITK as sitk

    src = Path(args.data_dir) / "ircadb01"
    if not (src / "ct.nii.gz").is_file() or not (src / "mask_liver.nii.gz").is_file():
        raise SystemExit(f"IRCAD data not found in {src} (expected ct.nii.gz and mask_liver.nii.gz).")
    work = Path(args.work_dir)
    (work / "slabs").mkdir(parents=True, exist_ok=True)
    ct = sitk.ReadImage(str(src / "ct.nii.gz"))
    liver = sitk.Cast(sitk.ReadImage(str(src / "mask_liver.nii.gz")) > 0, sitk.sitkUInt8)  # binary label map
    if ct.GetDirection() != (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0):
        # "cranial"/"caudal" assume the z axis points superior (LPS storage, as the shipped file)
        ct, liver = sitk.DICOMOrient(ct, "LPS"), sitk.DICOMOrient(liver, "LPS")
    arr = sitk.GetArrayViewFromImage(liver)
    total = int(arr.sum())
    parts = {}
    for name, ranges in split_slices(arr, args.split, args.slab_slices, args.gap_slices).items():
        slabs = []
        for lo, hi in ranges:
            stem = f"{name}_{lo:03d}-{hi - 1:03d}"
            img_path, mask_path = work / "slabs" / f"{stem}_ct.nii.gz", work / "slabs" / f"{stem}_liver.nii.gz"
            if not (img_path.exists() and mask_path.exists()):
                write_atomic(ct[:, :, lo:hi], img_path)  # SimpleITK slicing keeps origin/spacing/direction right
                write_atomic(liver[:, :, lo:hi], mask_path)
            slabs.append({"image": str(img_path.resolve()), "mask": str(mask_path.resolve()), "slices": [lo, hi - 1],
                          "liver_voxels": int(arr[lo:hi].sum())})
        voxels = sum(s["liver_voxels"] for s in slabs)
        if voxels == 0:
            raise SystemExit(f"the {name} part holds no liver; change --slab_slices / --gap_slices.")
        # paths relative to the CSV's folder (how the scripts resolve them), so the work dir can move
        table = pd.DataFrame({"Path": [os.path.relpath(s["image"], work.resolve()) for s in slabs],
                              "Mask": [os.path.relpath(s["mask"], work.resolve()) for s in slabs]})
        table.to_csv(work / f"{name}.csv", index=False)  # evaluation: each slab once
        reps = max(1, round(args.repeat / len(slabs)))
        table.loc[table.index.repeat(reps)].to_csv(work / f"{name}_train.csv", index=False)  # training crops
        parts[name] = {"slabs": slabs, "liver_voxels": voxels, "csv": str(work / f"{name}.csv"),
                       "train_csv": str(work / f"{name}_train.csv"), "crops_per_epoch": reps * len(slabs)}
        print(f"{name:8s} part: slices " + ", ".join(f"{s['slices'][0]}-{s['slices'][1]}" for s in slabs)
              + f": {voxels} liver voxels ({voxels / total:.0%} of the liver)")
    unused = total - sum(p["liver_voxels"] for p in parts.values())
    print(f"gaps of {args.gap_slices} slices ({args.gap_slices * ct.GetSpacing()[2]:.1f} mm) between neighbouring "
          f"slabs of different parts: {unused} liver voxels ({unused / total:.0%}) used by neither part")
    return parts


# ------------------------------------------------------------------------------------------------ runs
def run(cmd: list, log: Path) -> float:
    """Run `python SCRIPT ARGS` as a user would, in a fresh process; its output goes to `log`."""
    print("$ python " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(ROOT / cmd[0]), *map(str, cmd[1:])], stdout=f,
                           stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if r.returncode != 0:
        tail = "".join(Path(log).read_text().splitlines(keepends=True)[-5:])
        raise SystemExit(f"{cmd[0]} failed with exit status {r.returncode} (see {log}):\n{tail}")
    dt = time.time() - t0
    print(f"  done in {dt:.0f}s (log: {log})", flush=True)
    return dt


def preprocess_flags(args) -> list:
    return ["--spacing", *args.spacing, "--window", *args.window, "--cache_dir", Path(args.work_dir) / "cache"]


def pretrain(args, train_part: str, parts: dict) -> Path:
    """Tiny MAE on the training part's CT slabs and the TotalSegmentator example CTs (no labels, nothing held out)."""
    work = Path(args.work_dir)
    paths = [s["image"] for s in parts[train_part]["slabs"]]
    ts = Path(args.data_dir) / "totalseg"
    paths += [str(p) for p in (ts / "example_ct.nii.gz", ts / "example_ct_sm.nii.gz") if p.is_file()]
    csv = work / f"pretrain_{train_part}.csv"
    pd.DataFrame({"Path": paths * max(1, round(args.repeat / len(paths)))}).to_csv(csv, index=False)
    out = work / f"pretrain_{train_part}"
    run(["main_pretrain.py", "--data_path", csv, "--model", "mae_" + args.model, "--output_dir", out,
         "--resume", "none", "--input_size", *args.input_size, "--patch_size", *args.patch_size,
         "--epochs", args.pretrain_epochs, "--warmup_epochs", min(args.warmup_epochs, args.pretrain_epochs - 1),
         "--batch_size", args.batch_size, "--lr", args.lr, "--mask_ratio", 0.75,
         "--save_every", 1000, "--vis_every", 0, "--num_workers", args.num_workers, "--seed", args.seed,
         "--device", "cpu", "--print_freq", 1000, *preprocess_flags(args)], work / f"pretrain_{train_part}.log")
    return out / "mae_pretrained.pth"


def native_dice(args, ckpt: Path, part: dict, out: Path, name: str) -> float:
    """Liver Dice on the original 0.57x0.57x1.6 mm grid, voxels summed over the part's slabs: the label maps
    main_predict.py writes back onto each slab's own grid against the hand-drawn mask."""
    import SimpleITK as sitk

    seg_dir = out / f"predict_{name}"
    run(["main_predict.py", "--input_csv", part["csv"], "--output_csv", seg_dir / "predictions.csv",
         "--seg_output_dir", seg_dir, "--finetune", ckpt, "--batch_size", 1, "--sw_overlap", args.sw_overlap,
         "--num_workers", 0, "--device", "cpu", "--overwrite"], out / f"predict_{name}.log")
    table = pd.read_csv(seg_dir / "predictions.csv")
    if "error" in table and table["error"].notna().any():
        raise SystemExit(f"main_predict.py failed on some slabs: {seg_dir / 'predictions.csv'}")
    inter = total = 0
    for slab in part["slabs"]:
        seg = seg_dir / (Path(slab["image"]).name.removesuffix(".nii.gz") + "_seg.nii.gz")
        pred_img, ref_img = sitk.ReadImage(str(seg)), sitk.ReadImage(slab["mask"])
        if pred_img.GetSize() != ref_img.GetSize():
            raise SystemExit(f"{seg} has size {pred_img.GetSize()}, its mask {ref_img.GetSize()}.")
        pred, ref = sitk.GetArrayViewFromImage(pred_img) == 1, sitk.GetArrayViewFromImage(ref_img) > 0
        inter, total = inter + int((pred & ref).sum()), total + int(pred.sum()) + int(ref.sum())
    return 2.0 * inter / total if total else float("nan")


def run_fold(args, train_part: str, parts: dict) -> dict:
    work = Path(args.work_dir)
    (val_part,) = set(parts) - {train_part}
    out = work / f"train_{train_part}"
    init = pretrain(args, train_part, parts) if args.pretrain_epochs > 0 else "none"
    t_train = run(["main_finetune.py", "--task", "segmentation", "--train_csv", parts[train_part]["train_csv"],
                   "--val_csv", parts[val_part]["csv"], "--model", args.model, "--finetune", init,
                   "--input_size", *args.input_size, "--patch_size", *args.patch_size, "--epochs", args.epochs,
                   "--warmup_epochs", args.warmup_epochs, "--batch_size", args.batch_size, "--lr", args.lr,
                   "--layer_decay", args.layer_decay, "--feature_size", args.feature_size,
                   "--drop_path", args.drop_path, "--fg_prob", args.fg_prob, "--sw_overlap", args.sw_overlap,
                   "--num_workers", args.num_workers, "--seed", args.seed, "--device", "cpu",
                   "--output_dir", out, "--resume", "none", "--print_freq", 1000, *preprocess_flags(args)],
                  work / f"train_{train_part}.log")
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines() if line.strip()]
    last = out / "checkpoint-last.pth"
    run(["main_finetune.py", "--eval", "--resume", last, "--val_csv", parts[train_part]["csv"],
         "--metrics_json", out / "fit_metrics.json", "--sw_overlap", args.sw_overlap, "--num_workers", 0,
         "--device", "cpu"], work / f"fit_{train_part}.log")
    fit = json.loads((out / "fit_metrics.json").read_text())
    best = max(log, key=lambda r: r["val_dice_1"] if np.isfinite(r["val_dice_1"]) else -1)
    res = {"train_part": train_part, "heldout_part": val_part, "epochs": len(log), "train_seconds": round(t_train),
           "heldout_dice_last": log[-1]["val_dice_1"], "heldout_dice_best": best["val_dice_1"],
           "best_epoch": best["epoch"], "fit_dice_last": fit["dice_1"],
           "heldout_dice_native_last": native_dice(args, last, parts[val_part], out, val_part),
           "val_dice_per_epoch": [round(r["val_dice_1"], 4) for r in log],
           "train_loss_per_epoch": [round(r["train_loss"], 4) for r in log], "init": str(init)}
    (out / "summary.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> dict:
    args = get_args(argv)
    t0 = time.time()
    parts = prepare(args)
    folds = args.folds or list(parts)
    unknown = set(folds) - set(parts)
    if unknown:
        raise SystemExit(f"--folds {sorted(unknown)}: the {args.split} split has the parts {sorted(parts)}.")
    results = [run_fold(args, f, parts) for f in folds]
    init = "MAE-pretrained" if args.pretrain_epochs > 0 else "from scratch"
    print(f"\nIRCAD patient 1, liver, {args.split} split, {args.model} UNETR (feature size {args.feature_size}) "
          f"{init}, {args.epochs} epochs x ~{args.repeat} crops of {args.input_size} at {args.spacing} mm, "
          f"window {args.window} ({time.time() - t0:.0f}s in all):")
    for r in results:
        print(f"  train {r['train_part']:7s} -> held-out {r['heldout_part']:7s}: held-out Dice "
              f"{r['heldout_dice_last']:.3f} (last epoch; on the native grid {r['heldout_dice_native_last']:.3f}; "
              f"best epoch {r['best_epoch']}: {r['heldout_dice_best']:.3f}), fit Dice on the training part "
              f"{r['fit_dice_last']:.3f}, {r['train_seconds']}s training")
    summary = {"args": vars(args), "parts": parts, "folds": results, "seconds": round(time.time() - t0)}
    (Path(args.work_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
