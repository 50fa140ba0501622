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
from util.run_folder import STATUS, scratch_array, scratch_lists
from util.task.flags import PROBE_PROTOCOLS as PROTOCOLS, PROBE_TASKS

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
    g.add_argument("--embeddings", nargs="*", default=[], metavar="NAME=FILE",
                   help="embedding files of main_predict.py --embeddings (.npy with its .rows.csv, .csv, .parquet); "
                        "the first is the reference of the paired differences unless --reference says otherwise; "
                        "none: only the --columns of --labels are evaluated")
    g.add_argument("--labels", default=None, help="label table (CSV); default: the row table of the first embedding "
                                                  "file, which holds every column of the CSV it was made from")
    g.add_argument("--label_columns", nargs="+", default=["Label"],
                   help="label column(s); several make a multi-label task")
    g.add_argument("--task", default="auto", choices=("auto", *PROBE_TASKS),
                   help="auto: several columns multi-label; one column of text or of up to 20 integer values "
                        "classification; other numbers regression")
    g.add_argument("--columns", nargs="+", default=[], metavar="NAME=COL[,COL]",
                   help="label-table columns evaluated as one more feature set (a baseline: size=diameter_mm)")
    g.add_argument("--id_columns", nargs="+", default=None,
                   help="columns that identify a row in the label table and the embedding files (as written); "
                        "default: Path, with coordX coordY coordZ when the label table has them (lesion rows)")
    g.add_argument("--group_column", default=None, help="patient or exam column: no group in two folds, and the "
                                                        "bootstrap resamples whole groups")
    g.add_argument("--split_column", default=None, help="given split instead of k folds: train/test values, or one "
                                                        "test fold per distinct value")
    g.add_argument("--pretraining", nargs="+", default=[], metavar="NAME=SOURCE",
                   help="the pretraining data behind embedding NAME: its checkpoint (main_pretrain.py records a "
                        "manifest beside it), a data_manifest.csv.gz, or a list/CSV of paths (by path only)")
    g = p.add_argument_group("protocol")
    g.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS,
                   help="logreg: standardised features, logistic regression (ridge for regression) with C chosen "
                        "by inner 3-fold CV; knn: k-nearest neighbours (Euclidean, standardised features)")
    g.add_argument("--folds", type=bounded(int, min=2), default=5, help="cross-validation folds (stratified)")
    g.add_argument("--label_fractions", type=bounded(float, min=0, max=1, min_open=True), nargs="+",
                   default=[0.01, 0.1, 0.25, 1.0], help="share of each training fold's labels a probe may use")
    g.add_argument("--draws", type=bounded(int, min=1), default=5,
                   help="label draws per fraction below 1 (nested: a draw's 1%% is inside its 10%%)")
    g.add_argument("--knn_k", type=bounded(int, min=1), default=20, help="neighbours of the k-NN probe")
    g.add_argument("--jobs", type=bounded(int, min=1), default=min(5, CPUS),
                   help="probes run in parallel processes (folds, fractions, draws, feature sets; k-NN's neighbours "
                        "are found first in this process with every core); default: min(5, CPUs)")
    g.add_argument("--inner_max_rows", type=bounded(int, min=100), default=10000,
                   help="rows of the inner cross-validation that chooses C (a stratified subsample above this)")
    g = p.add_argument_group("statistics and output")
    g.add_argument("--bootstrap", type=bounded(int, min=0), default=1000,
                   help="bootstrap resamples of the rows (of whole groups with --group_column) for 95%% "
                        "intervals; every probe is refitted on each resample's training rows (0: no intervals)")
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
from util.cli import run_main  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.evaluate.crossval import fold_job, fold_neighbours  # noqa: E402
from util.evaluate.probe import labelled_rows, make_folds  # noqa: E402
from util.evaluate.stats import refit_interval, resample_weights  # noqa: E402
from util.task.weighted import nanmean  # noqa: E402


def id_columns(args, table, what: str) -> list[str]:
    """--id_columns, or Path (with coordX coordY coordZ when the table has them: lesion rows, one line says so)."""
    if args.id_columns:
        return inputs.need_columns(table, args.id_columns, what, "--id_columns")
    coords = [inputs.find_column(table, c) for c in ("coordX", "coordY", "coordZ")]
    cols = inputs.need_columns(table, ["Path"], what, "--id_columns")
    if all(coords):
        print(f"Lesion rows: {what} has coordX, coordY and coordZ, so a row is identified by its Path and point "
              f"({', '.join([*cols, *coords])}); --id_columns chooses others.", flush=True)
        cols += coords
    return cols


def load(args) -> dict:
    """Feature sets aligned to the label table, its rows sorted by their id so that row order never matters."""
    files = [inputs.named(s, "--embeddings") for s in args.embeddings]
    sources = [inputs.open_embeddings(name, path) for name, path in files]
    if not sources and not (args.columns and args.labels):
        raise UserError("Nothing to evaluate: pass --embeddings NAME=FILE, or --labels with --columns NAME=COL "
                        "(label-table columns as features).")
    table, what = inputs.read_labels(args.labels, sources[0] if sources else None)
    ids = id_columns(args, table, what)
    keys = inputs.row_keys(table, ids)
    inputs.check_unique(keys, table, what, ids)
    order = np.argsort(keys, kind="stable")
    table, keys = table.iloc[order], keys[order]
    y, task, names = inputs.targets(table, args.label_columns, args.task, what)
    sets = {fs.name: inputs.gather(fs, inputs.align(fs, keys, ids, table, what)) for fs in sources}
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
                groups=groups, split=split, ids=ids)


def shared_arrays(sets: dict, counts, jobs: int, folder: str) -> tuple[dict, object]:
    """What each probe job reads: the arrays themselves in this process, or, with several jobs, .npy copies in
    `folder` that the worker processes read memory-mapped (features, and the resample counts)."""
    if jobs <= 1:
        return sets, counts
    out = {}
    for k, (name, x) in enumerate(sets.items()):
        out[name] = scratch_array(folder, k)
        np.save(out[name], x)
    if counts is not None:
        np.save(os.path.join(folder, "counts.npy"), counts)
        counts = os.path.join(folder, "counts.npy")
    return out, counts


def resample_counts(args, d: dict) -> np.ndarray | None:
    """[R, n] uint8: how many copies of each row the R bootstrap resamples hold (whole groups with
    --group_column); the same resamples for every feature set, probe and fraction, so differences are paired."""
    if not args.bootstrap:
        return None
    n = len(d["y"])
    out = np.zeros((args.bootstrap, n), np.uint8)
    done = 0
    for w in resample_weights(n, args.bootstrap, args.seed, d["groups"]):
        out[done:done + len(w)] = np.minimum(w, 255)
        done += len(w)
    return out


def knn_lists(sources: dict, folds: list, labelled: list, args, folder: str) -> dict:
    """{(set, fold, (fraction, draw)): .npz path} of every feature set, fold and draw's neighbour lists, computed
    here one fold at a time with every core and written to `folder` for the job that votes with them (at 100,000
    rows, 16 draws: about 160 MB a fold on disk, never all of them in memory)."""
    out = {}
    for name, source in sources.items():
        for f, (train, test) in enumerate(folds):
            for key, (idx, d2) in fold_neighbours(source, train, test, labelled[f], args.knn_k).items():
                out[(name, f, key)] = scratch_lists(folder, len(out))
                np.savez(out[(name, f, key)], idx=idx.astype(np.int32), d2=d2)
    return out


def run_probes(args, d: dict) -> tuple[pd.DataFrame, dict]:
    """Every probe, fraction and draw on every feature set: the per-draw metrics (results.csv) and, per (set,
    protocol, fraction), each metric's mean over draws and folds on the rows and on every resample
    {key: {metric: [1 + R]}}. Jobs (--jobs processes): a feature set's fold (k-NN) or fold and fraction."""
    import tempfile

    from joblib import Parallel, delayed

    strata = d["y"] if d["task"].single_label else None
    folds = make_folds(len(d["y"]), args.folds, args.seed, strata, d["groups"], d["split"], args.split_column,
                       d["names"])
    fractions = sorted(set(args.label_fractions))
    labelled = [{(fr, k): labelled_rows(tr, strata, fr, args.seed, f, k)
                 for fr in fractions for k in range(1 if fr >= 1 else args.draws)} for f, (tr, _) in enumerate(folds)]
    rows, values = [], {}
    counts = resample_counts(args, d)
    with tempfile.TemporaryDirectory(prefix="main_evaluate-") as tmp, Parallel(n_jobs=args.jobs) as parallel:
        sources, counts_src = shared_arrays(d["sets"], counts, args.jobs, tmp)
        for protocol in args.protocols:
            t0 = time.time()
            # logreg: a job per fold and fraction. k-NN: first the neighbours of every fold in this process
            # (threaded: one distance computation serves every fraction and draw), then a job per fold and draw
            # for the votes and metrics (the resampled votes are single-threaded numpy: processes share them)
            parts = [(fr,) for fr in fractions] if protocol != "knn" else sorted(labelled[0])
            jobs = [(name, f, part) for name in d["sets"] for f in range(len(folds)) for part in parts]
            lists = knn_lists(sources, folds, labelled, args, tmp) if protocol == "knn" else {}
            done = parallel(delayed(fold_job)(sources[name], *folds[f], d["y"], d["groups"],
                                              {k: v for k, v in labelled[f].items() if k[:len(part)] == part},
                                              protocol, d["task"], len(d["names"]), d["names"], args.seed,
                                              args.knn_k, args.inner_max_rows, counts_src,
                                              lists.get((name, f, part))) for name, f, part in jobs)
            by_set = {name: [{} for _ in folds] for name in d["sets"]}
            for (name, f, _), out in zip(jobs, done):
                by_set[name][f].update(out)
            for name, per_fold in by_set.items():
                for fraction in fractions:
                    draws = sorted(k for fr, k in per_fold[0] if fr == fraction)
                    cells = [[fold[(fraction, k)] for fold in per_fold] for k in draws]  # [draw][fold]
                    metrics = list(cells[0][0][0])
                    stack = {m: np.array([[c[0][m] for c in draw] for draw in cells]) for m in metrics}  # [D, F, 1+R]
                    values[(name, protocol, fraction)] = {m: nanmean(v.reshape(-1, v.shape[-1]))
                                                          for m, v in stack.items()}
                    for j, k in enumerate(draws):
                        rows.append({"embedding": name, "protocol": protocol, "fraction": fraction, "draw": k,
                                     "n_labelled": int(round(np.mean([c[1] for c in cells[j]]))),
                                     "n_test": int(sum(len(te) for _, te in folds)),
                                     **{m: float(nanmean(v[j, :, 0])) for m, v in stack.items()}})
            print(f"{protocol}: {len(d['sets'])} feature sets x {len(folds)} folds x {len(fractions)} label fractions "
                  f"({args.draws} draws below 100%), {args.bootstrap} refitted resamples, in "
                  f"{time.time() - t0:.1f} s", flush=True)
    return pd.DataFrame(rows), values


RANGES = {"auroc": (0.0, 1.0), "balanced_accuracy": (0.0, 1.0), "r2": (-np.inf, 1.0), "mae": (0.0, np.inf)}


def statistics(args, d: dict, results: pd.DataFrame, values: dict) -> pd.DataFrame:
    """One row per (set, protocol, fraction): each headline metric's mean over draws and folds with its 95%
    percentile interval over the refitted resamples, and the paired difference to the reference (the same
    resamples) with its interval and the draws it was ahead in."""
    task, primary, out = d["task"], d["task"].primary_metric, []
    for (name, protocol, fraction), mine in values.items():
        sel = results[(results.embedding == name) & (results.protocol == protocol) & (results.fraction == fraction)]
        row = {"embedding": name, "protocol": protocol, "fraction": fraction, "draws": len(sel),
               "n_labelled": int(round(sel["n_labelled"].mean())), "n_test": int(sel["n_test"].iloc[0])}
        for m in task.headline:
            row[m], row[f"{m}_low"], row[f"{m}_high"] = refit_interval(mine[m], bounds=RANGES[m])
        if name != d["reference"]:
            ref = values[(d["reference"], protocol, fraction)]
            span = RANGES[primary][1] - RANGES[primary][0]
            row[f"diff_{primary}"], row["diff_low"], row["diff_high"] = refit_interval(mine[primary], ref[primary],
                                                                                      bounds=(-span, span))
            mine_d = sel.sort_values("draw")[primary].to_numpy()
            ref_d = results[(results.embedding == d["reference"]) & (results.protocol == protocol)
                            & (results.fraction == fraction)].sort_values("draw")[primary].to_numpy()
            ahead = sum(task.is_better(float(a), float(b), primary) for a, b in zip(mine_d, ref_d))
            row["ahead_in_draws"] = f"{ahead} of {len(mine_d)}"
        out.append(row)
    return pd.DataFrame(out)


def evaluated_paths(args, d: dict) -> list[str]:
    """Absolute paths of the evaluated scans, in the table's (sorted) order. A label table's relative paths
    resolve against its own folder. The row table of an embedding file holds its paths as main_predict.py read
    them, relative to an --input_csv it does not name: relative ones need that CSV as --labels."""
    from util.data.path_table import resolve_paths

    col = inputs.find_column(d["table"], "Path")
    if col is None:
        raise UserError(f"--pretraining needs a Path column in {d['what']} to know which scans were evaluated.")
    if args.labels:
        return resolve_paths(d["table"], col, args.labels, check_exists=False)
    values = d["table"][col].astype(str).str.strip()
    relative = values[~values.map(lambda v: os.path.isabs(os.path.expanduser(v)))]
    if len(relative):
        raise UserError(f"--pretraining: {d['what']} holds relative paths ({relative.iloc[0]!r} and "
                        f"{len(relative) - 1} more), relative to the CSV main_predict.py read, which the row table "
                        f"does not name; pass that CSV as --labels so that they resolve against its folder.")
    return [os.path.normpath(os.path.expanduser(v)) for v in values]


def overlap(args, d: dict) -> pd.DataFrame | None:
    """Evaluated scans that were in the pretraining data of their encoder (--pretraining), by path or content;
    scans that could not be read for the content check are listed as unreadable. `row` is the label table's row
    (counted from 1 under the header)."""
    if not args.pretraining:
        return None
    from util.data.manifest import find_overlap
    from util.evaluate.pretraining import pretraining_scans

    paths = evaluated_paths(args, d)
    rows = [int(line) - 1 for line in d["table"].index]
    found = []
    for spec in args.pretraining:
        name, source = inputs.named(spec, "--pretraining")
        if name not in d["sets"]:
            raise UserError(f"--pretraining {spec}: {name} is not one of the feature sets ({', '.join(d['sets'])}).")
        manifest, what = pretraining_scans(source)
        hits = find_overlap(paths, manifest, rows=rows)
        hits.insert(0, "embedding", name)
        found.append(hits)
        n_by = hits["matched_by"].value_counts().to_dict()
        n_hit = n_by.get("path", 0) + n_by.get("content", 0)
        print(f"{name}: {n_hit} of {len(paths)} evaluated scans were in its pretraining data ({what}, "
              f"{len(manifest)} scans)" + (f": {n_by.get('path', 0)} by path, {n_by.get('content', 0)} by content "
                                           f"(same bytes elsewhere)" if n_hit else ""), flush=True)
        bad = hits[hits.matched_by == "unreadable"]
        if len(bad):
            print(f"{name}: {len(bad)} evaluated scans could not be read, so their content was not compared (first: "
                  f"row {bad.row.iloc[0]}, {bad.path.iloc[0] or 'empty path'}: {bad.pretraining_path.iloc[0]}); "
                  f"they are listed in overlap.csv as unreadable.", flush=True)
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
    results, values = run_probes(args, d)
    summary = statistics(args, d, results, values)
    text = report.summary_markdown(args, d, summary, hits)
    report.write_all(outputs, results, summary, text, hits, d["task"])
    print("\n" + report.console_table(summary, d["task"]))
    print(f"\nDone in {time.time() - t0:.0f} s. Wrote " + ", ".join(outputs.values()))


def cli_main(argv: list[str] | None = None):
    args = parse_args(argv)
    return run_main(main, args, os.path.join(args.output_dir, STATUS))


if __name__ == "__main__":
    sys.exit(cli_main())
