"""main_evaluate.py's k-NN probe: the engine of util/evaluate/knn.py against the scikit-learn brute force it
replaced, side by side on the same standardised folds, label fractions and draws, with repeats; and the whole
probe at 100,000 x 1,024 through main_evaluate.py.

    python bench/bench_knn.py                       # 20,000 x 1,024, 5 folds, fractions 0.01 0.1 0.25 1, 5 draws
    python bench/bench_knn.py --rows 100000 --only_folds 1 --repeats 1   # one fold at full size (12 min)
    python bench/bench_knn.py --full                # also main_evaluate.py --protocols knn at 100,000 x 1,024
    python bench/bench_knn.py --full --skip_side_by_side --full_protocol logreg --full_bootstrap 1000
    python bench/bench_knn.py --full --skip_side_by_side --before 187ae8d --repeats 2 --full_bootstrap 0 200

Prints the seconds of each engine per repeat (alternating which runs first), their ratio, and how far the
probabilities differ (rows whose k-th and next neighbour tie to 1e-6 are counted apart: float32 cannot order
them).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from util.evaluate import knn  # noqa: E402
from util.evaluate.crossval import knn_depth  # noqa: E402
from util.evaluate.probe import labelled_rows, make_folds, standardiser  # noqa: E402


def folds_and_subsets(n: int, args, y: np.ndarray):
    folds = make_folds(n, args.folds, 0, y)
    keys = [(fr, k) for fr in sorted(args.fractions) for k in range(1 if fr >= 1 else args.draws)]
    return [(tr, te, [labelled_rows(tr, y, fr, 0, f, k) for fr, k in keys]) for f, (tr, te) in enumerate(folds)]


def old_engine(a, b, y_train, subsets_pos, k):
    """Today's probe before this change: one scikit-learn brute-force k-NN per fraction and draw."""
    from sklearn.neighbors import KNeighborsClassifier

    out = []
    for pos in subsets_pos:
        clf = KNeighborsClassifier(min(k, len(pos)), weights="distance", algorithm="brute").fit(a[pos], y_train[pos])
        p = np.zeros((len(b), 2))
        p[:, clf.classes_] = clf.predict_proba(b)
        out.append(p)
    return out


def new_engine(a, b, y_train, subsets_pos, k):
    found = knn.neighbours(a, b, subsets_pos, min(knn_depth(k), len(a)))
    out = []
    for pos, (idx, d2) in zip(subsets_pos, found):
        local = np.where(idx >= 0, np.searchsorted(pos, np.maximum(idx, 0)), -1)
        out.append(knn.votes(local, d2, np.eye(2)[y_train[pos]], min(k, len(pos))))
    return out, found


def side_by_side(args) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    y = (rng.random(args.rows) < 0.3).astype(np.int64)
    work = folds_and_subsets(args.rows, args, y)[:args.only_folds]
    times = {"scikit-learn": [], "util/evaluate/knn.py": []}
    worst, ties, rows = 0.0, 0, 0
    for rep in range(args.repeats):
        for name in (list(times) if rep % 2 == 0 else list(times)[::-1]):
            t0 = time.perf_counter()
            results = []
            for tr, te, subsets in work:
                mean, scale = standardiser(x[tr])
                a, b = ((x[tr] - mean) / scale).astype(np.float32), ((x[te] - mean) / scale).astype(np.float32)
                pos = [np.searchsorted(tr, s) for s in subsets]
                results.append(old_engine(a, b, y[tr], pos, args.k) if name == "scikit-learn"
                               else new_engine(a, b, y[tr], pos, args.k))
            times[name].append(time.perf_counter() - t0)
            if name == "scikit-learn":
                old = results
            else:
                new = results
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    for old_fold, (new_fold, found) in zip(old, new):
        for p_old, p_new, (_, d2) in zip(old_fold, new_fold, found):
            k = min(args.k, d2.shape[1])
            d = np.sqrt(d2)
            near = (np.abs(d[:, k] - d[:, k - 1]) < 1e-6 * d[:, k - 1]) if d2.shape[1] > k else np.zeros(len(d), bool)
            ties += int(near.sum())
            rows += len(d)
            worst = max(worst, float(np.abs(p_old - p_new)[~near].max()))
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"{args.rows} x {args.dim}, {args.only_folds or args.folds} of {args.folds} folds, fractions {args.fractions}, {args.draws} draws, "
          f"k = {args.k}: scikit-learn {med['scikit-learn']:.1f} s, util/evaluate/knn.py "
          f"{med['util/evaluate/knn.py']:.1f} s (median of {args.repeats}): "
          f"{med['scikit-learn'] / med['util/evaluate/knn.py']:.1f}x faster; probabilities differ by at most "
          f"{worst:.1e} ({ties} of {rows} rows have a float32 tie at the k-th neighbour and were not compared)")


def _worktree(rev: str, folder: str) -> Path:
    """A checkout of `rev` (the code before a change) to run side by side with this one."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", folder, rev], check=True,
                   capture_output=True)
    return Path(folder)


def full_run(args) -> None:
    """main_evaluate.py --protocols knn (or --full_protocol logreg) at 100,000 x 1,024 (groups of 2 rows, 36%
    positives), timed as a user would time it; the probe's own line gives its seconds. With --before REV the same
    command of that commit runs alternately with this one (--repeats each), and the metrics are compared."""
    import pandas as pd

    rng = np.random.default_rng(0)
    n, d = 100_000, 1024
    with tempfile.TemporaryDirectory(prefix="bench_knn-") as tmp:
        x = rng.standard_normal((n, d), dtype=np.float32)
        y = (rng.random(n) < 1 / (1 + np.exp(-(1.5 * x @ (rng.standard_normal(d) / 32) - 0.8)))).astype(int)
        np.save(f"{tmp}/emb.npy", x)
        table = pd.DataFrame({"Path": [f"s/{i:06d}.nii.gz" for i in range(n)], "Label": y,
                              "PatientID": [f"p{i // 2:05d}" for i in range(n)]})
        table.assign(row=np.arange(1, n + 1), error="").to_csv(f"{tmp}/emb.npy.rows.csv", index=False)
        del x
        codes = {"this tree": ROOT}
        if args.before:
            codes[f"before ({args.before})"] = _worktree(args.before, f"{tmp}/before")
        try:
            for boot in args.full_bootstrap:
                seconds = {name: [] for name in codes}
                for rep in range(args.repeats if args.before else 1):
                    for name in (list(codes) if rep % 2 == 0 else list(codes)[::-1]):
                        out_dir = f"{tmp}/out-{len(seconds[name])}-{list(codes).index(name)}"
                        cmd = [sys.executable, str(codes[name] / "main_evaluate.py"), "--embeddings",
                               f"big={tmp}/emb.npy", "--group_column", "PatientID", "--protocols", args.full_protocol,
                               "--bootstrap", str(boot), "--output_dir", out_dir, "--overwrite"]
                        t0 = time.perf_counter()
                        out = subprocess.run(cmd, capture_output=True, text=True,
                                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
                        seconds[name].append(time.perf_counter() - t0)
                        line = next((s for s in out.stdout.splitlines() if s.startswith(f"{args.full_protocol}:")),
                                    out.stderr[-500:])
                        print(f"100,000 x 1,024, --bootstrap {boot}, {name}: {seconds[name][-1]:.0f} s in all; {line}",
                              flush=True)
                if args.before:
                    new, old = (f"{tmp}/out-0-{i}/results.csv" for i in range(2))
                    a, b = pd.read_csv(new), pd.read_csv(old)
                    metrics = [c for c in a.columns if a[c].dtype.kind == "f" and c != "fraction"]
                    diff = float(np.abs(a[metrics].to_numpy() - b[metrics].to_numpy()).max())
                    med = {k: float(np.median(v)) for k, v in seconds.items()}
                    names = list(codes)
                    print(f"--bootstrap {boot}: {names[0]} {med[names[0]]:.0f} s, {names[1]} {med[names[1]]:.0f} s "
                          f"(median of {args.repeats}, whole command): {med[names[1]] / med[names[0]]:.2f}x faster; "
                          f"results.csv metrics differ by at most {diff:.1e}", flush=True)
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", f"{tmp}/before"],
                               capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser("k-NN probe: util/evaluate/knn.py against scikit-learn's brute force")
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 0.25, 1.0])
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only_folds", type=int, default=None, help="time the first N folds only (at 100,000 rows the "
                   "old engine takes about 40 minutes for all five)")
    p.add_argument("--full", action="store_true", help="also main_evaluate.py --protocols knn at 100,000 x 1,024")
    p.add_argument("--full_bootstrap", type=int, nargs="+", default=[0, 200])
    p.add_argument("--full_protocol", choices=("knn", "logreg"), default="knn",
                   help="the probe --full times (logreg: the linear probe with its refitted resamples)")
    p.add_argument("--skip_side_by_side", action="store_true", help="only the --full run")
    p.add_argument("--before", default=None, help="with --full: also run main_evaluate.py of this git revision, "
                   "alternating with this tree, --repeats times each (a git worktree in the temporary folder)")
    args = p.parse_args()
    if not args.skip_side_by_side:
        side_by_side(args)
    if args.full:
        full_run(args)


if __name__ == "__main__":
    main()
