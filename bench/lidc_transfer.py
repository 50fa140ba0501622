"""Real-data proof that MAE pretraining helps: LIDC-IDRI lung nodules, benign vs malignant, few labels.

Steps (all through the user-facing scripts, commands printed):
  (a) pretrain a tiny 3D MAE on every training nodule, without labels (main_pretrain.py);
  (b) finetune it with a fraction of the training labels (main_finetune.py --finetune ...);
  (c) train the same ViT from scratch on the same labels (main_finetune.py --finetune none);
  (d) a size-only baseline: logistic regression on diameter_mm (scikit-learn).
The split is by exam (patient), never by nodule. Test AUROC is reported for all of them.

    python bench/lidc_transfer.py                 # full run (~30 min on 2 busy CPU cores)
    python bench/lidc_transfer.py --quick         # smoke test (< 1 min)

Measured (seed 0, 163 labelled / 229 test nodules, defaults): MAE-pretrained 0.868, scratch 0.865,
size-only 0.883 test AUROC: at this scale pretraining does not yet beat the size baseline.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "lidc_nodules"


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser("LIDC nodule transfer benchmark")
    p.add_argument("--data_dir", default=str(DATA), help="folder with nodules_32x64x64.npz and nodules.csv")
    p.add_argument("--work_dir", default="output_dir/lidc_transfer")
    p.add_argument("--label_fraction", type=float, default=0.25, help="share of training nodules with labels")
    p.add_argument("--test_fraction", type=float, default=0.25, help="share of exams held out for testing")
    p.add_argument("--patch_size", type=int, nargs=3, default=[8, 16, 16])
    p.add_argument("--pretrain_epochs", type=int, default=40)
    p.add_argument("--finetune_epochs", type=int, default=40)
    p.add_argument("--norm_pix_loss", action="store_true", help="pretrain on per-patch normalised targets")
    p.add_argument("--pretrain_blr", type=float, default=1.5e-3)
    p.add_argument("--finetune_blr", type=float, default=2e-3)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny subset and 1 epoch each (smoke test)")
    return p.parse_args()


def split_by_exam(table: pd.DataFrame, test_fraction: float, label_fraction: float, seed: int):
    """Boolean masks (train, test, labelled-train): exams shuffled with `seed`, labels drawn among train rows."""
    rng = np.random.default_rng(seed)
    exams = np.sort(table["exam_id"].astype(str).unique())
    exams = exams[rng.permutation(len(exams))]
    test_exams = set(exams[: int(round(len(exams) * test_fraction))])
    test = table["exam_id"].astype(str).isin(test_exams).to_numpy()
    train_idx = np.flatnonzero(~test)
    n_lab = max(4, int(round(len(train_idx) * label_fraction)))
    labelled = np.zeros(len(table), dtype=bool)
    labelled[rng.choice(train_idx, size=n_lab, replace=False)] = True
    return ~test, test, labelled


def write_volumes(images: np.ndarray, rows: np.ndarray, out_dir: Path) -> list[str]:
    """Each nodule [32, 64, 64] uint8 -> out_dir/nodule_XXXX.nii.gz at 1 mm (skipped when already written)."""
    import SimpleITK as sitk

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in rows:
        path = out_dir / f"nodule_{i:04d}.nii.gz"
        if not path.exists():
            img = sitk.GetImageFromArray(images[i])  # numpy [D, H, W] -> SimpleITK size (W, H, D)
            img.SetSpacing((1.0, 1.0, 1.0))
            tmp = path.with_name("tmp_" + path.name)
            sitk.WriteImage(img, str(tmp))
            os.replace(tmp, path)
        paths.append(str(path))
    return paths


def prepare(args) -> dict:
    """Write NIfTI volumes and the CSVs; returns their paths and the split tables."""
    data = np.load(Path(args.data_dir) / "nodules_32x64x64.npz")
    table = pd.read_csv(Path(args.data_dir) / "nodules.csv")
    images, labels = data["images"], data["labels"]
    if len(table) != len(images) or not np.array_equal(table["label"].to_numpy(), labels):
        raise SystemExit(f"{args.data_dir}: nodules.csv and nodules_32x64x64.npz disagree (row count or labels).")
    train, test, labelled = split_by_exam(table, args.test_fraction, args.label_fraction, args.seed)
    if args.quick:  # a small, fixed subset that still has both classes in every split
        keep = np.zeros(len(table), dtype=bool)
        for mask, n in ((train, 48), (test, 24)):
            for c in (0, 1):
                keep[np.flatnonzero(mask & (labels == c))[: n // 2]] = True
        train, test = train & keep, test & keep
        labelled = train.copy()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = np.flatnonzero(train | test)
    table["Path"] = pd.Series(dict(zip(rows, write_volumes(images, rows, work / "volumes"))))
    table["Label"] = labels.astype(int)
    csvs = {"pretrain": work / "pretrain.csv", "labelled": work / "train_labelled.csv", "test": work / "test.csv"}
    table.loc[train, ["Path"]].to_csv(csvs["pretrain"], index=False)
    table.loc[labelled, ["Path", "Label"]].to_csv(csvs["labelled"], index=False)
    table.loc[test, ["Path", "Label"]].to_csv(csvs["test"], index=False)
    malignant = {k: table.loc[m, "Label"].mean() for k, m in (("lab", labelled), ("test", test))}
    print(f"Split by exam: {train.sum()} training nodules ({labelled.sum()} labelled, {malignant['lab']:.2f}"
          f" malignant), {test.sum()} test nodules ({malignant['test']:.2f} malignant), "
          f"{table.loc[train, 'exam_id'].nunique()} / {table.loc[test, 'exam_id'].nunique()} exams.")
    return {"csvs": csvs, "table": table, "labelled": labelled, "test": test}


def run(cmd: list[str], log: Path) -> None:
    """Run one script as `python SCRIPT ARGS` would, in this process (imports paid once); output goes to `log`."""
    print("$ python " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    t0, argv = time.time(), sys.argv
    sys.argv = [str(ROOT / cmd[0]), *map(str, cmd[1:])]
    try:
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            runpy.run_path(str(ROOT / cmd[0]), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise SystemExit(f"{cmd[0]} failed: {e.code}\n(see {log})") from None
    finally:
        sys.argv = argv
    print(f"  done in {time.time() - t0:.0f}s (log: {log})", flush=True)


def common_flags(args, work: Path) -> list:
    return ["--input_size", 32, 64, 64, "--patch_size", *args.patch_size, "--window", 0, 255,
            "--cache_dir", work / "cache", "--num_workers", 0 if args.quick else args.num_workers, "--seed", args.seed,
            "--print_freq", 1000]


def finetune(args, prep: dict, name: str, init: str) -> dict:
    """Finetune (or train from scratch, init='none') on the labelled nodules; returns the test metrics."""
    work = Path(args.work_dir)
    out = work / name
    epochs = 1 if args.quick else args.finetune_epochs
    cmd = ["main_finetune.py", "--train_csv", prep["csvs"]["labelled"], "--test_csv", prep["csvs"]["test"],
           "--model", "vit_tiny_patch16", "--finetune", init, "--output_dir", out, "--resume", "none",
           "--epochs", epochs, "--warmup_epochs", 0 if args.quick else 5, "--batch_size", 16 if not args.quick else 8,
           "--blr", args.finetune_blr, "--layer_decay", 0.75, "--drop_path", 0.1, "--smoothing", 0.0,
           *common_flags(args, work)]
    run(cmd, work / f"{name}.log")
    return json.loads((out / "test_metrics.json").read_text())


def size_baseline(prep: dict) -> float:
    """Test AUROC of logistic regression on diameter_mm trained on the labelled nodules."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    t, lab, test = prep["table"], prep["labelled"], prep["test"]
    x = np.log(t[["diameter_mm"]].to_numpy(dtype=np.float64))
    clf = LogisticRegression().fit(x[lab], t["Label"][lab])
    return float(roc_auc_score(t["Label"][test], clf.predict_proba(x[test])[:, 1]))


def main() -> dict:
    args = get_args()
    if not (Path(args.data_dir) / "nodules.csv").is_file():
        raise SystemExit(f"LIDC nodules not found in {args.data_dir} (expected nodules.csv and nodules_32x64x64.npz).")
    work = Path(args.work_dir)
    t0 = time.time()
    prep = prepare(args)
    pre_epochs = 1 if args.quick else args.pretrain_epochs
    run(["main_pretrain.py", "--data_path", prep["csvs"]["pretrain"], "--model", "mae_vit_tiny_patch16",
         "--output_dir", work / "pretrain", "--resume", "none", "--epochs", pre_epochs,
         "--warmup_epochs", 0 if args.quick else 5, "--batch_size", 16 if args.quick else args.batch_size,
         "--blr", args.pretrain_blr, "--mask_ratio", 0.75, "--save_every", 1000, "--vis_every", 0,
         *(["--norm_pix_loss"] if args.norm_pix_loss else []), *common_flags(args, work)],
        work / "pretrain.log")
    results = {"pretrained_finetune": finetune(args, prep, "finetune_mae", work / "pretrain" / "mae_pretrained.pth"),
               "scratch": finetune(args, prep, "scratch", "none")}
    size_auc = size_baseline(prep)
    print(f"\nLIDC benign vs malignant, {prep['labelled'].sum()} labelled training nodules, "
          f"{prep['test'].sum()} test nodules ({time.time() - t0:.0f}s in all):")
    for name, m in results.items():
        print(f"  {name:22s} test AUROC {m['auroc']:.3f}  balanced acc {m['balanced_accuracy']:.3f}")
    print(f"  {'size-only (diameter)':22s} test AUROC {size_auc:.3f}")
    summary = {k: v["auroc"] for k, v in results.items()} | {"size_only": size_auc,
                                                               "n_labelled": int(prep["labelled"].sum()),
                                                               "n_test": int(prep["test"].sum())}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
