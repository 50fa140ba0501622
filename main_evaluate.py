"""Compare frozen encoders on your own labels: a logistic-regression probe and k-NN on the embeddings that
`main_predict.py --embeddings` writes, cross-validated, at several label fractions, with bootstrap intervals and
paired differences; optionally checks whether the evaluated scans were in an encoder's pretraining data.

    python main_evaluate.py --embeddings mae=emb_mae.npy tangerine=emb_tangerine.npy --labels labels.csv \\
        --group_column PatientID --columns size=diameter_mm --output_dir out/evaluate
"""
from __future__ import annotations

import os
import sys
import time

from util import args as cli_args
from util.args import bounded
from util.task.flags import PROBE_TASKS

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
EXAMPLES = """  python main_evaluate.py --embeddings mae=mae.npy random=random.npy --labels labels.csv
  python main_evaluate.py --embeddings tangerine=t.npy ours=o.parquet --labels labels.csv --group_column PatientID \\
      --columns size=diameter_mm --label_fractions 0.01 0.1 0.25 1 --draws 5 --reference tangerine
  python main_evaluate.py --embeddings ours=o.npy --labels labels.csv --label_columns A B C   # multi-label
  python main_evaluate.py --embeddings ours=o.npy --pretraining ours=out/pretrain/mae_pretrained.pth
  python main_evaluate.py --embeddings t=t.npy --labels l.csv --split_column Split --pretraining t=tangerine_scans.txt
"""


def get_args_parser():
    p = cli_args.make_parser("main_evaluate.py", "Frozen-embedding evaluation: linear probe and k-NN on "
                             "main_predict.py embeddings, label-efficiency curve, bootstrap intervals, paired "
                             "differences and a pretraining-overlap check.", EXAMPLES)
    g = p.add_argument_group("inputs")
    g.add_argument("--embeddings", nargs="+", required=True, metavar="NAME=FILE",
                   help="embedding files of main_predict.py --embeddings (.npy with its .rows.csv, .csv, .parquet); "
                        "the first is the reference of the paired differences unless --reference says otherwise")
    g.add_argument("--labels", default=None, help="label table (CSV); default: the row table of the first embedding "
                                                  "file, which holds every column of the CSV it was made from")
    g.add_argument("--label_columns", nargs="+", default=["Label"],
                   help="label column(s); several make a multi-label task")
    g.add_argument("--task", default="auto", choices=("auto", *PROBE_TASKS),
                   help="auto: several columns multi-label; one column of text or of up to 20 integer values "
                        "classification; other numbers regression")
    g.add_argument("--columns", nargs="+", default=[], metavar="NAME=COL[,COL]",
                   help="label-table columns evaluated as one more feature set (a baseline: size=diameter_mm)")
    g.add_argument("--id_columns", nargs="+", default=["Path"],
                   help="columns that identify a row in the label table and the embedding files (as written)")
    g.add_argument("--group_column", default=None, help="patient or exam column: no group in two folds, and the "
                                                        "bootstrap resamples whole groups")
    g.add_argument("--split_column", default=None, help="given split instead of k folds: train/test values, or one "
                                                        "test fold per distinct value")
    g.add_argument("--pretraining", nargs="+", default=[], metavar="NAME=SOURCE",
                   help="the pretraining data behind embedding NAME: its checkpoint (main_pretrain.py records a "
                        "manifest beside it), a data_manifest.csv.gz, or a list/CSV of paths (by path only)")
    g = p.add_argument_group("protocol")
    g.add_argument("--protocols", nargs="+", default=["logreg", "knn"], choices=("logreg", "knn"),
                   help="logreg: standardised features, logistic regression (ridge for regression) with C chosen "
                        "by inner 3-fold CV; knn: k-nearest neighbours (Euclidean, standardised features)")
    g.add_argument("--folds", type=bounded(int, min=2), default=5, help="cross-validation folds (stratified)")
    g.add_argument("--label_fractions", type=bounded(float, min=0, max=1, min_open=True), nargs="+",
                   default=[0.01, 0.1, 0.25, 1.0], help="share of each training fold's labels a probe may use")
    g.add_argument("--draws", type=bounded(int, min=1), default=5,
                   help="label draws per fraction below 1 (nested: a draw's 1%% is inside its 10%%)")
    g.add_argument("--knn_k", type=bounded(int, min=1), default=20, help="neighbours of the k-NN probe")
    g.add_argument("--jobs", type=bounded(int, min=1), default=min(5, CPUS),
                   help="probes run in parallel processes (folds, draws, feature sets); default: min(5, CPUs)")
    g.add_argument("--inner_max_rows", type=bounded(int, min=100), default=10000,
                   help="rows of the inner cross-validation that chooses C (a stratified subsample above this)")
    g = p.add_argument_group("statistics and output")
    g.add_argument("--bootstrap", type=bounded(int, min=0), default=1000,
                   help="resamples of the test rows for 95%% intervals (0: none)")
    g.add_argument("--reference", default=None, help="feature set the others are compared to (default: the first)")
    g.add_argument("--seed", type=bounded(int, min=0), default=0, help="folds, label draws and resamples")
    g.add_argument("--output_dir", default=os.path.join("output_dir", "evaluate"),
                   help="results.csv, summary.csv, summary.md, label_efficiency.png (and overlap.csv)")
    g.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier evaluation")
    return p


def parse_args(argv: list[str] | None = None):
    return cli_args.parse(get_args_parser(), argv)


cli_args.parse_before_imports(__name__, get_args_parser)  # --help and bad values: answered before sklearn loads

# no torch here: embeddings are numpy arrays; only --pretraining with a checkpoint imports it (util/data/manifest.py)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from util.evaluate import inputs  # noqa: E402
from util.evaluate import report  # noqa: E402
from util.errors import UserError, run_main  # noqa: E402
from util.evaluate.probe import labelled_rows, make_folds, probe_job  # noqa: E402
from util.evaluate.stats import Run, bootstrap_values, interval, weighted_metrics  # noqa: E402


def load(args) -> dict:
    """Feature sets aligned to the label table, its rows sorted by their id so that row order never matters."""
    files = [inputs.named(s, "--embeddings") for s in args.embeddings]
    sources = [inputs.open_embeddings(name, path) for name, path in files]
    table, what = inputs.read_labels(args.labels, sources[0])
    id_cols = inputs.need_columns(table, args.id_columns, what, "--id_columns")
    keys = inputs.row_keys(table, id_cols)
    inputs.check_unique(keys, table, what, args.id_columns)
    order = np.argsort(keys, kind="stable")
    table, keys = table.iloc[order], keys[order]
    y, task, names = inputs.targets(table, args.label_columns, args.task, what)
    sets = {fs.name: inputs.gather(fs, inputs.align(fs, keys, args.id_columns, table, what)) for fs in sources}
    for spec in args.columns:
        name, cols = inputs.named(spec, "--columns")
        sets[name] = inputs.column_features(name, table, cols.split(","), what).matrix
    if len(sets) != len(files) + len(args.columns):
        raise UserError("--embeddings and --columns must give every feature set its own NAME.")
    reference = args.reference or next(iter(sets))
    if reference not in sets:
        raise UserError(f"--reference {reference} is not one of the feature sets ({', '.join(sets)}).")
    groups = split = None
    if args.group_column:
        col = inputs.need_columns(table, [args.group_column], what, "--group_column")[0]
        groups = np.unique(table[col].astype(str).str.strip().to_numpy(), return_inverse=True)[1]
    if args.split_column:
        split = table[inputs.need_columns(table, [args.split_column], what, "--split_column")[0]].astype(str) \
            .str.strip().to_numpy()
    return dict(table=table, what=what, keys=keys, y=y, task=task, names=names, sets=sets, reference=reference,
                groups=groups, split=split)


def feature_sources(sets: dict, jobs: int, folder: str) -> dict:
    """What each probe job reads: the arrays themselves in this process, or, with several jobs, .npy copies in
    `folder` that the worker processes read memory-mapped."""
    if jobs <= 1:
        return sets
    out = {}
    for k, (name, x) in enumerate(sets.items()):
        out[name] = os.path.join(folder, f"features_{k}.npy")
        np.save(out[name], x)
    return out


def run_probes(args, d: dict) -> tuple[pd.DataFrame, dict, np.ndarray]:
    """Every probe, fraction and draw on every feature set: the per-draw metrics, the out-of-fold runs
    {(set, protocol, fraction): [Run per draw]} and the rows they predict. Folds, draws and sets run as
    independent jobs (--jobs processes)."""
    import tempfile

    from joblib import Parallel, delayed

    strata = d["y"] if d["task"].single_label else None
    folds = make_folds(len(d["y"]), args.folds, args.seed, strata, d["groups"], d["split"])
    tested = np.sort(np.concatenate([te for _, te in folds]))
    where = np.full(len(d["y"]), -1)
    where[tested] = np.arange(len(tested))
    n_out, y = len(d["names"]), d["y"]
    rows, runs = [], {}
    with tempfile.TemporaryDirectory(prefix="main_evaluate-") as tmp, Parallel(n_jobs=args.jobs) as parallel:
        sources = feature_sources(d["sets"], args.jobs, tmp)
        for protocol in args.protocols:
            for fraction in sorted(set(args.label_fractions)):
                t0 = time.time()
                draws = range(1 if fraction >= 1 else args.draws)
                labelled = {(f, k): labelled_rows(tr, strata, fraction, args.seed, f, k) for k in draws
                            for f, (tr, _) in enumerate(folds)}
                jobs = [(k, name, f) for k in draws for name in d["sets"] for f in range(len(folds))]
                done = parallel(delayed(probe_job)(sources[name], labelled[f, k], folds[f][1], y[labelled[f, k]],
                                                   protocol, d["task"], n_out, args.seed, args.knn_k,
                                                   args.inner_max_rows) for k, name, f in jobs)
                for k in draws:
                    for name in d["sets"]:
                        parts = [(f, r) for (kk, nn, f), r in zip(jobs, done) if kk == k and nn == name]
                        first = parts[0][1]
                        scores = np.zeros((len(tested), first.scores.shape[1]))
                        pred = None if first.pred is None else \
                            np.zeros((len(tested), *first.pred.shape[1:]), np.int64)
                        for f, r in parts:
                            scores[where[folds[f][1]]] = r.scores
                            if pred is not None:
                                pred[where[folds[f][1]]] = r.pred
                        run = Run(scores, pred)
                        runs.setdefault((name, protocol, fraction), []).append(run)
                        m = weighted_metrics(d["task"], y[tested], run, np.ones((1, len(tested))), d["names"])
                        n_lab = np.mean([len(labelled[f, k]) for f in range(len(folds))])
                        rows.append({"embedding": name, "protocol": protocol, "fraction": fraction, "draw": k,
                                     "n_labelled": int(round(n_lab)), "n_test": len(tested),
                                     **{key: float(v[0]) for key, v in m.items()}})
                print(f"{protocol} at {fraction:g} of the labels: {len(d['sets'])} feature sets x {len(draws)} draws "
                      f"x {len(folds)} folds in {time.time() - t0:.1f} s", flush=True)
    return pd.DataFrame(rows), runs, tested


def statistics(args, d: dict, results: pd.DataFrame, runs: dict, tested: np.ndarray) -> pd.DataFrame:
    """One row per (set, protocol, fraction): mean over draws of the headline metrics with 95% bootstrap
    intervals, and the paired difference to the reference with its interval and the draws it was ahead in."""
    y, task = d["y"][tested], d["task"]
    groups = None if d["groups"] is None else np.unique(d["groups"][tested], return_inverse=True)[1]
    primary, out = task.primary_metric, []
    for protocol in args.protocols:
        for fraction in sorted(set(args.label_fractions)):
            keys = [(name, protocol, fraction) for name in d["sets"]]
            flat = [r for k in keys for r in runs[k]]
            vals = bootstrap_values(task, y, flat, args.bootstrap, args.seed, groups, d["names"])
            per = {}
            for k in keys:
                per[k], vals = vals[:len(runs[k])], vals[len(runs[k]):]
            ref = per[(d["reference"], protocol, fraction)]
            for name, _, _ in keys:
                mine = per[(name, protocol, fraction)]
                sel = results[(results.embedding == name) & (results.protocol == protocol)
                              & (results.fraction == fraction)]
                row = {"embedding": name, "protocol": protocol, "fraction": fraction, "draws": len(mine),
                       "n_labelled": int(sel["n_labelled"].mean()), "n_test": len(tested)}
                for m in task.headline:
                    row[m], row[f"{m}_low"], row[f"{m}_high"] = interval([v[m] for v in mine])
                if name != d["reference"]:
                    diff = interval([v[primary] for v in mine], [v[primary] for v in ref])
                    row[f"diff_{primary}"], row["diff_low"], row["diff_high"] = diff
                    mine_d = sel.sort_values("draw")[primary].to_numpy()
                    ref_d = results[(results.embedding == d["reference"]) & (results.protocol == protocol)
                                    & (results.fraction == fraction)].sort_values("draw")[primary].to_numpy()
                    better = mine_d < ref_d if primary == "mae" else mine_d > ref_d
                    row["ahead_in_draws"] = f"{int(better.sum())} of {len(better)}"
                out.append(row)
    return pd.DataFrame(out)


def overlap(args, d: dict) -> pd.DataFrame | None:
    """Evaluated scans that were in the pretraining data of their encoder (--pretraining), by path or content."""
    if not args.pretraining:
        return None
    from util.data.manifest import find_overlap, pretraining_data
    from util.data.path_table import resolve_paths

    col = inputs.find_column(d["table"], "Path")
    if col is None:
        raise UserError(f"--pretraining needs a Path column in {d['what']} to know which scans were evaluated.")
    base = args.labels or args.embeddings[0].partition("=")[2] or args.embeddings[0]
    paths = resolve_paths(d["table"], col, base, check_exists=False)
    found = []
    for spec in args.pretraining:
        name, source = inputs.named(spec, "--pretraining")
        if name not in d["sets"]:
            raise UserError(f"--pretraining {spec}: {name} is not one of the feature sets ({', '.join(d['sets'])}).")
        manifest, what = pretraining_data(source)
        hits = find_overlap(paths, manifest)
        hits.insert(0, "embedding", name)
        found.append(hits)
        n_by = hits["matched_by"].value_counts().to_dict()
        print(f"{name}: {len(hits)} of {len(paths)} evaluated scans were in its pretraining data ({what}, "
              f"{len(manifest)} scans)" + (f": {n_by.get('path', 0)} by path, {n_by.get('content', 0)} by content "
                                           f"(same bytes elsewhere)" if len(hits) else ""), flush=True)
    return pd.concat(found, ignore_index=True)


def main(args) -> None:
    outputs = report.output_paths(args.output_dir, bool(args.pretraining))
    report.check_outputs(outputs, args.overwrite)
    t0 = time.time()
    d = load(args)
    n_feat = ", ".join(f"{k} ({v.shape[1]})" for k, v in d["sets"].items())
    print(f"{len(d['y'])} labelled rows, task {d['task'].name} ({', '.join(d['names'][:10])}); feature sets: {n_feat}",
          flush=True)
    hits = overlap(args, d)
    results, runs, tested = run_probes(args, d)
    summary = statistics(args, d, results, runs, tested)
    text = report.summary_markdown(args, d, summary, hits)
    report.write_all(outputs, results, summary, text, hits, d["task"])
    print("\n" + report.console_table(summary, d["task"]))
    print(f"\nDone in {time.time() - t0:.0f} s. Wrote " + ", ".join(outputs.values()))


def cli_main(argv: list[str] | None = None):
    return run_main(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli_main())
