"""The size-only rows of bench/lidc_transfer.py step (e) without pretraining or embeddings (minutes, not hours):
main_evaluate.py on the LIDC nodules with the same exam split and flags, the annotated diameter and the crop's
voxel count as the only feature sets (--columns, no --embeddings).

    python bench/lidc_size_only.py                          # writes output_dir/lidc_size_only/evaluate
    python bench/lidc_size_only.py --bootstrap 200          # quicker intervals
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from lidc_transfer import DATA, split_by_exam  # noqa: E402  (the split step (e) uses)


def main() -> None:
    p = argparse.ArgumentParser("LIDC size-only baselines through main_evaluate.py")
    p.add_argument("--data_dir", default=str(DATA))
    p.add_argument("--work_dir", default="output_dir/lidc_size_only")
    p.add_argument("--test_fraction", type=float, default=0.25)
    p.add_argument("--label_fraction", type=float, default=0.25)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args()
    table = pd.read_csv(Path(args.data_dir) / "nodules.csv")
    images = np.load(Path(args.data_dir) / "nodules_32x64x64.npz")["images"]
    train, test = split_by_exam(table, args.test_fraction, args.seed)
    voxels = (images > 0).reshape(len(images), -1).sum(1)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    labels = pd.DataFrame({"Path": [f"nodule_{i:04d}.nii.gz" for i in range(len(table))], "Label": table["label"],
                           "exam_id": table["exam_id"], "split": np.where(test, "test", "train"),
                           "log_diameter": np.log(table["diameter_mm"].clip(lower=1)),
                           "log_voxels": np.log(np.maximum(voxels, 1))})[train | test]
    labels.to_csv(work / "labels.csv", index=False)
    cmd = [sys.executable, str(ROOT / "main_evaluate.py"), "--labels", str(work / "labels.csv"), "--columns",
           "size=log_diameter", "voxels=log_voxels", "--split_column", "split", "--group_column", "exam_id",
           "--label_fractions", str(args.label_fraction), "1", "--draws", str(args.draws), "--reference", "size",
           "--seed", str(args.seed), "--bootstrap", str(args.bootstrap), "--output_dir", str(work / "evaluate"),
           "--overwrite"]
    print("$ " + " ".join(cmd), flush=True)
    raise SystemExit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
