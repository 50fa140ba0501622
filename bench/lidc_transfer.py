"""Real-data proof that MAE pretraining helps: LIDC-IDRI lung nodules, benign vs malignant, few labels.

Steps (all through the user-facing scripts, commands printed):
  (a) pretrain a tiny 3D MAE on every training nodule, without labels (main_pretrain.py, --norm_pix_loss);
  (b) finetune it with a fraction of the training labels (main_finetune.py --finetune ...), and linear-probe it
      (main_finetune.py --linprobe);
  (c) train the same ViT from scratch on the same labels (main_finetune.py --finetune none);
  (d) size-only baselines: logistic regression on the annotated diameter_mm, and on the crop's nodule voxel count;
  (e) the frozen encoder against those baselines with main_evaluate.py (embeddings from main_predict.py).
The split is by exam (patient), never by nodule; (b)-(e) are repeated on several labelled subsets
(--label_seeds) of the same training exams. Test AUROC is reported for all of them.

    python bench/lidc_transfer.py                 # full run (about 2 h on 2 CPU cores)
    python bench/lidc_transfer.py --quick         # smoke test (< 1 min)

A finished arm whose command is unchanged is reused, so arms and seeds can be run in separate invocations
(--arms, --label_seeds) sharing one --work_dir; the README lists the measured numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import runpy
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from util.atomic import atomic_write  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "lidc_nodules"


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser("LIDC nodule transfer benchmark")
    p.add_argument("--data_dir", default=str(DATA), help="folder with nodules_32x64x64.npz and nodules.csv")
    p.add_argument("--work_dir", default="output_dir/lidc_transfer")
    p.add_argument("--label_fraction", type=float, default=0.25, help="share of training nodules with labels")
    p.add_argument("--test_fraction", type=float, default=0.25, help="share of exams held out for testing")
    p.add_argument("--patch_size", type=int, nargs=3, default=[8, 16, 16])
    p.add_argument("--pretrain_epochs", type=int, default=150)
    p.add_argument("--finetune_epochs", type=int, default=40)
    p.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="pretrain on per-patch normalised targets (the plain pixel loss learns little on these "
                        "segmented, mostly-zero crops)")
    p.add_argument("--pretrain_blr", type=float, default=1.5e-3)
    p.add_argument("--finetune_blr", type=float, default=2e-3)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="exam split and training seeds")
    p.add_argument("--label_seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="finetune on one labelled subset per seed (same exam split, same pretraining)")
    p.add_argument("--pretrained", default=None,
                   help="reuse this mae_pretrained.pth (made with the same --seed and --work_dir split) instead of "
                        "pretraining again")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--arms", nargs="+", choices=["pretrained", "linprobe", "scratch"],
                   default=["pretrained", "linprobe", "scratch"],
                   help="pretrained: finetune the MAE encoder; linprobe: linear probe on it, frozen; scratch: same ViT "
                        "from random init (a finished arm with the same command is reused, not rerun)")
    p.add_argument("--quick", action="store_true", help="tiny subset and 1 epoch each (smoke test)")
    return p.parse_args()


def split_by_exam(table: pd.DataFrame, test_fraction: float, seed: int):
    """Boolean masks (train, test): exams shuffled with `seed`, the first `test_fraction` of them held out."""
    rng = np.random.default_rng(seed)
    exams = np.sort(table["exam_id"].astype(str).unique())
    exams = exams[rng.permutation(len(exams))]
    test_exams = set(exams[: int(round(len(exams) * test_fraction))])
    test = table["exam_id"].astype(str).isin(test_exams).to_numpy()
    return ~test, test


def draw_labelled(train: np.ndarray, label_fraction: float, label_seed: int) -> np.ndarray:
    """Boolean mask of the training rows whose labels the finetuning may use (drawn with `label_seed`)."""
    train_idx = np.flatnonzero(train)
    n_lab = max(4, int(round(len(train_idx) * label_fraction)))
    labelled = np.zeros(len(train), dtype=bool)
    labelled[np.random.default_rng([label_seed, 1]).choice(train_idx, size=n_lab, replace=False)] = True
    return labelled


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
            atomic_write(path, lambda tmp: sitk.WriteImage(img, tmp))
        paths.append(str(path))
    return paths


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Atomic CSV write, so two invocations sharing --work_dir (different --label_seeds) never read half a file."""
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def prepare(args) -> dict:
    """Write NIfTI volumes, the pretraining and test CSVs; returns their paths and the split tables."""
    data = np.load(Path(args.data_dir) / "nodules_32x64x64.npz")
    table = pd.read_csv(Path(args.data_dir) / "nodules.csv")
    images, labels = data["images"], data["labels"]
    if len(table) != len(images) or not np.array_equal(table["label"].to_numpy(), labels):
        raise SystemExit(f"{args.data_dir}: nodules.csv and nodules_32x64x64.npz disagree (row count or labels).")
    train, test = split_by_exam(table, args.test_fraction, args.seed)
    if args.quick:  # a small, fixed subset that still has both classes in every split
        keep = np.zeros(len(table), dtype=bool)
        for mask, n in ((train, 48), (test, 24)):
            for c in (0, 1):
                keep[np.flatnonzero(mask & (labels == c))[: n // 2]] = True
        train, test = train & keep, test & keep
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = np.flatnonzero(train | test)
    table["Path"] = pd.Series(dict(zip(rows, write_volumes(images, rows, work / "volumes"))))
    table["Label"] = labels.astype(int)
    table["voxels"] = (images > 0).reshape(len(images), -1).sum(1)  # segmented crops: nodule volume in voxels
    csvs = {"pretrain": work / "pretrain.csv", "test": work / "test.csv"}
    write_csv(table.loc[train, ["Path"]], csvs["pretrain"])
    write_csv(table.loc[test, ["Path", "Label"]], csvs["test"])
    print(f"Split by exam: {train.sum()} training nodules, {test.sum()} test nodules "
          f"({table.loc[test, 'Label'].mean():.2f} malignant), "
          f"{table.loc[train, 'exam_id'].nunique()} / {table.loc[test, 'exam_id'].nunique()} exams.")
    return {"csvs": csvs, "table": table, "train": train, "test": test}


def labelled_csv(args, prep: dict, label_seed: int) -> tuple[Path, np.ndarray]:
    """Write the labelled subset for `label_seed` (every training row in --quick mode); returns (csv, mask)."""
    labelled = prep["train"].copy() if args.quick else draw_labelled(prep["train"], args.label_fraction, label_seed)
    path = Path(args.work_dir) / f"train_labelled_seed{label_seed}.csv"
    write_csv(prep["table"].loc[labelled, ["Path", "Label"]], path)
    print(f"Label seed {label_seed}: {labelled.sum()} labelled nodules "
          f"({prep['table'].loc[labelled, 'Label'].mean():.2f} malignant).", flush=True)
    return path, labelled


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


def run_once(cmd: list, log: Path, result: Path) -> None:
    """`run(cmd)` unless `result` exists from the very same command (recorded beside it), so reruns reuse arms."""
    record = result.with_name(result.name + ".command.json")  # one record per result: arm and prediction differ
    if result.is_file() and record.is_file() and json.loads(record.read_text()) == [str(c) for c in cmd]:
        print(f"Reusing {result} (same command; delete it to run again)", flush=True)
        return
    run(cmd, log)
    record.write_text(json.dumps([str(c) for c in cmd]))


def common_flags(args, work: Path) -> list:
    return ["--input_size", 32, 64, 64, "--patch_size", *args.patch_size, "--window", 0, 255,
            "--cache_dir", work / "cache", "--num_workers", 0 if args.quick else args.num_workers, "--seed", args.seed,
            "--print_freq", 1000]


def finetune(args, prep: dict, train_csv: Path, name: str, init, linprobe: bool = False) -> dict:
    """Finetune (or train from scratch, init='none'; or linear-probe the frozen encoder) on the labelled nodules.

    Returns the test metrics. The linear probe takes main_finetune.py's --linprobe recipe (LARS, blr 0.1, no decay).
    """
    work = Path(args.work_dir)
    out = work / name
    epochs = 1 if args.quick else args.finetune_epochs
    recipe = (["--linprobe"] if linprobe else
              ["--blr", args.finetune_blr, "--layer_decay", 0.75, "--drop_path", 0.1, "--smoothing", 0.0])
    cmd = ["main_finetune.py", "--train_csv", train_csv, "--test_csv", prep["csvs"]["test"],
           "--model", "vit_tiny_patch16", "--finetune", init, "--output_dir", out, "--resume", "none",
           "--epochs", epochs, "--warmup_epochs", 0 if args.quick else 5, "--batch_size", 16 if not args.quick else 8,
           *recipe, *common_flags(args, work)]
    run_once(cmd, work / f"{name}.log", out / "test_metrics.json")
    return json.loads((out / "test_metrics.json").read_text())


def test_scores(args, prep: dict, name: str) -> np.ndarray:
    """Malignancy probability of every test nodule (test.csv order) from arm `name`'s last checkpoint, written by
    main_predict.py to <arm>/test_predictions.csv."""
    out = Path(args.work_dir) / name
    cmd = ["main_predict.py", "--input_csv", prep["csvs"]["test"], "--finetune", out / "checkpoint-last.pth",
           "--output_csv", out / "test_predictions.csv", "--overwrite", "--cache_dir", Path(args.work_dir) / "cache",
           "--num_workers", 0]
    run_once(cmd, Path(args.work_dir) / f"{name}_predict.log", out / "test_predictions.csv")
    pred = pd.read_csv(out / "test_predictions.csv")
    return pred[[c for c in pred.columns if c.startswith("prob_")][-1]].to_numpy(dtype=np.float64)


def paired_bootstrap(y: np.ndarray, scores: list[np.ndarray], references: list[np.ndarray], n: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean over labelled subsets k of AUROC(scores[k]) - AUROC(references[k]) on the test nodules, with a 95%
    interval from resampling the test nodules (one resample shared by every score and reference): the bootstrap
    of main_evaluate.py (util/evaluate/stats.py), the one implementation in this repository."""
    from util.evaluate.stats import Run, bootstrap
    from util.task.tasks import BinaryTask

    return bootstrap(BinaryTask(), np.asarray(y), [Run(np.asarray(s, np.float64)) for s in scores],
                     [Run(np.asarray(r, np.float64)) for r in references], n_boot=n, seed=seed)["auroc"]


def size_baseline(prep: dict, labelled: np.ndarray, column: str = "diameter_mm") -> float:
    """Test AUROC of logistic regression on log(`column`) (annotated diameter, or the crop's nodule voxel count)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    t, test = prep["table"], prep["test"]
    x = np.log(t[[column]].to_numpy(dtype=np.float64).clip(min=1))
    clf = LogisticRegression().fit(x[labelled], t["Label"][labelled])
    return float(roc_auc_score(t["Label"][test], clf.predict_proba(x[test])[:, 1]))


def frozen_evaluation(args, prep: dict, ckpt: Path) -> pd.DataFrame:
    """Step (e): the frozen encoder against the size baselines with main_evaluate.py, as a user would run it on
    their own table: embeddings of every nodule (main_predict.py --embeddings, average-pooled), the same exam
    split (--split_column), --label_fraction of the training labels in one draw per label seed, logistic
    regression and k-NN, intervals from resampling test exams. Returns its summary.csv."""
    work = Path(args.work_dir)
    rows = prep["train"] | prep["test"]
    t = prep["table"].loc[rows]
    labels = work / "evaluate_labels.csv"
    write_csv(pd.DataFrame({"Path": [str(Path(p).resolve()) for p in t["Path"]], "Label": t["Label"],
                            "exam_id": t["exam_id"], "split": np.where(prep["test"][rows], "test", "train"),
                            "log_diameter": np.log(t["diameter_mm"].clip(lower=1)),
                            "log_voxels": np.log(t["voxels"].clip(lower=1))}), labels)
    emb = work / "embeddings_pretrained.npy"
    run_once(["main_predict.py", "--input_csv", labels, "--finetune", ckpt, "--embeddings", emb, "--embedding_type",
              "avg", "--overwrite", "--cache_dir", work / "cache", "--num_workers", 0], work / "embed.log", emb)
    out = work / "evaluate"
    seeds = args.label_seeds[:1] if args.quick else args.label_seeds
    run_once(["main_evaluate.py", "--embeddings", f"mae={emb}", "--labels", labels, "--columns", "size=log_diameter",
              "voxels=log_voxels", "--split_column", "split", "--group_column", "exam_id", "--label_fractions",
              args.label_fraction, 1, "--draws", len(seeds), "--reference", "size", "--seed", args.seed,
              "--bootstrap", 100 if args.quick else 2000, "--output_dir", out, "--overwrite"],
             work / "evaluate.log", out / "summary.csv")
    print((out / "summary.md").read_text().split("\n\n")[2], flush=True)  # the table
    return pd.read_csv(out / "summary.csv")


def pretrain(args, prep: dict) -> Path:
    """Step (a): MAE pretraining on every training nodule, no labels; returns mae_pretrained.pth."""
    if args.pretrained:
        print(f"Reusing the pretrained MAE {args.pretrained}")
        return Path(args.pretrained)
    work = Path(args.work_dir)
    cmd = ["main_pretrain.py", "--data_path", prep["csvs"]["pretrain"], "--model", "mae_vit_tiny_patch16",
           "--output_dir", work / "pretrain", "--resume", "none", "--epochs", 1 if args.quick else args.pretrain_epochs,
           "--warmup_epochs", 0 if args.quick else 5, "--batch_size", 16 if args.quick else args.batch_size,
           "--blr", args.pretrain_blr, "--mask_ratio", 0.75, "--save_every", 1000, "--vis_every", 0,
           *(["--norm_pix_loss"] if args.norm_pix_loss else []), *common_flags(args, work)]
    run_once(cmd, work / "pretrain.log", work / "pretrain" / "mae_pretrained.pth")
    return work / "pretrain" / "mae_pretrained.pth"


def main() -> dict:
    args = get_args()
    if not (Path(args.data_dir) / "nodules.csv").is_file():
        raise SystemExit(f"LIDC nodules not found in {args.data_dir} (expected nodules.csv and nodules_32x64x64.npz).")
    t0 = time.time()
    prep = prepare(args)
    ckpt = pretrain(args, prep) if {"pretrained", "linprobe"} & set(args.arms) else None
    rows = []
    for label_seed in args.label_seeds[:1] if args.quick else args.label_seeds:
        train_csv, labelled = labelled_csv(args, prep, label_seed)
        row = {"label_seed": label_seed, "n_labelled": int(labelled.sum())}
        for arm, init in (("pretrained", ckpt), ("linprobe", ckpt), ("scratch", "none")):
            if arm in args.arms:
                row[arm] = finetune(args, prep, train_csv, f"{arm}_seed{label_seed}", init, arm == "linprobe")["auroc"]
        rows.append(row | {"size_only": size_baseline(prep, labelled),
                           "voxels_only": size_baseline(prep, labelled, "voxels")})
        print("  test AUROC " + "  ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if isinstance(v, float)),
              flush=True)
    res = pd.DataFrame(rows)
    print(f"\nLIDC benign vs malignant, {args.label_fraction:.0%} of the training labels, "
          f"{int(prep['test'].sum())} test nodules from held-out exams ({time.time() - t0:.0f}s in all):")
    print(res.to_string(index=False, float_format="%.3f"))
    arms = [*args.arms, "size_only", "voxels_only"]
    print("mean (sd): " + "  ".join(f"{k} {res[k].mean():.3f} ({res[k].std(ddof=1) if len(res) > 1 else 0:.3f})"
                                    for k in arms))
    seeds, t = [r["label_seed"] for r in rows], prep["table"].loc[prep["test"]]
    y, diameter = t["Label"].to_numpy(), t["diameter_mm"].to_numpy(dtype=np.float64)
    refs = {"size_only": [diameter] * len(seeds)}  # logistic regression on log(diameter) ranks as diameter does
    if "scratch" in res:
        refs["scratch"] = [test_scores(args, prep, f"scratch_seed{k}") for k in seeds]
    intervals = {}
    for arm in [a for a in ("pretrained", "linprobe") if a in res]:
        scores = [test_scores(args, prep, f"{arm}_seed{k}") for k in seeds]
        for other, ref in refs.items():
            d = res[arm] - res[other]
            point, lo, hi = paired_bootstrap(y, scores, ref, n=100 if args.quick else 2000)
            intervals[f"{arm} - {other}"] = {"mean": point, "ci95": [lo, hi], "better": int((d > 0).sum())}
            print(f"{arm} - {other}: mean {point:+.3f} (95% interval over resampled test nodules {lo:+.3f} .. "
                  f"{hi:+.3f}), better in {(d > 0).sum()} of {len(d)} labelled subsets")
    frozen = frozen_evaluation(args, prep, ckpt) if ckpt is not None else None
    summary = {"label_fraction": args.label_fraction, "n_test": int(prep["test"].sum()), "pretrained_from": str(ckpt),
               "frozen_features": None if frozen is None else
               frozen.astype(object).where(frozen.notna(), None).to_dict(orient="records"),
               "runs": rows, "mean": {k: float(res[k].mean()) for k in arms}, "differences": intervals}
    (Path(args.work_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
