"""main_evaluate.py: probes on frozen embeddings, the properties that cannot be faked (noise at chance, the label
itself perfect, row order and seed), grouped folds, nested label draws, the weighted metrics of the one bootstrap,
and bad inputs as one sentence."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from tests.helpers import run_in_process
import engine_predict as predict_io
from util.evaluate.probe import MIN_PER_CLASS, labelled_rows, make_folds
from util.evaluate.stats import Run, bootstrap, weighted_metrics

N, DIM = 160, 12


def save_embeddings(path, table: pd.DataFrame, emb: np.ndarray, errors: dict | None = None) -> str:
    """Write `emb` exactly as main_predict.py --embeddings does (its own writer), rows of `table` in order."""
    results = {i: ({"error": errors[i]} if errors and i in errors else {"emb": emb[i]}) for i in range(len(table))}
    predict_io.write_embeddings(str(path), table, results, emb.shape[1])
    return str(path)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """160 scans of 60 patients: a label, an informative embedding, pure noise, and a size column."""
    d = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], N // 2)
    table = pd.DataFrame({"Path": [f"scans/ct_{i:03d}.nii.gz" for i in range(N)], "Label": y.astype(str),
                          "Patient": rng.integers(0, 60, N).astype(str),
                          "diameter_mm": np.round(8 + 4 * y + rng.normal(0, 3, N), 2).astype(str)})
    table.to_csv(d / "labels.csv", index=False)
    good = rng.normal(size=(N, DIM)).astype(np.float32)
    good[:, :3] += 1.2 * y[:, None]
    noise = rng.normal(size=(N, DIM)).astype(np.float32)
    files = {"good": save_embeddings(d / "good.npy", table, good), "noise": save_embeddings(d / "noise.csv", table,
                                                                                          noise)}
    return dict(dir=d, table=table, good=good, noise=noise, files=files)


def evaluate(case, out, *extra, labels=None, files=None):
    files = files or case["files"]
    r = run_in_process("main_evaluate.py", "--embeddings", *[f"{k}={v}" for k, v in files.items()],
                       "--labels", labels or case["dir"] / "labels.csv", "--columns", "oracle=Label",
                       "--group_column", "Patient", "--folds", 4, "--label_fractions", 0.5, 1, "--draws", 2,
                       "--bootstrap", 300, "--output_dir", out, *extra)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r, pd.read_csv(out / "results.csv"), pd.read_csv(out / "summary.csv")


@pytest.fixture(scope="module")
def first_run(case, tmp_path_factory):
    return evaluate(case, tmp_path_factory.mktemp("first"))


def test_noise_is_at_chance_and_the_label_itself_is_perfect(first_run):
    r, results, summary = first_run
    full = summary[summary.fraction == 1].set_index(["embedding", "protocol"])
    for protocol in ("logreg", "knn"):
        noise = full.loc[("noise", protocol)]
        assert noise.auroc_low < 0.5 < noise.auroc_high, (protocol, noise.auroc, noise.auroc_low, noise.auroc_high)
        assert full.loc[("oracle", protocol)].auroc == 1.0 and full.loc[("oracle", protocol)].auroc_low == 1.0
        assert full.loc[("oracle", protocol)].balanced_accuracy == 1.0
        assert full.loc[("good", protocol)].auroc_low > 0.7  # a real signal is found
        # the paired difference to the reference (good) is the difference of the means, ahead in no draw
        assert abs(noise.diff_auroc - (noise.auroc - full.loc[("good", protocol)].auroc)) < 1e-5  # 6 digits in the CSV
        assert noise.diff_high < 0 and noise.ahead_in_draws == "0 of 1"
    # one row per feature set, protocol, fraction and draw; a row per draw below 100% only
    assert len(results) == 3 * 2 * (2 + 1)
    assert set(results.n_labelled[results.fraction == 1]) == {120}
    assert "| linear probe | 100% (120) | noise |" in r.stdout and "label_efficiency.png" in r.stdout


def test_outputs_are_written(first_run, tmp_path):
    r, _, _ = first_run
    out = r.stdout.rsplit("Wrote ", 1)[1].split(", ")[0].rsplit("/", 1)[0]
    from PIL import Image

    with Image.open(f"{out}/label_efficiency.png") as img:
        assert img.size[0] >= 800 and len(set(img.convert("RGB").getdata())) > 10  # two panels, drawn lines
    text = open(f"{out}/summary.md").read()
    assert "grouped by Patient" in text and "| k-NN | 50% (" in text


def test_row_order_does_not_matter_and_the_seed_decides(case, first_run, tmp_path):
    perm = np.random.default_rng(1).permutation(N)
    table = case["table"].iloc[perm].reset_index(drop=True)
    table.iloc[np.random.default_rng(2).permutation(N)].to_csv(tmp_path / "labels.csv", index=False)
    files = {"good": save_embeddings(tmp_path / "good.npy", table, case["good"][perm]),
             "noise": save_embeddings(tmp_path / "noise.csv", table, case["noise"][perm])}
    _, shuffled, summary = evaluate(case, tmp_path / "out", labels=tmp_path / "labels.csv", files=files)
    _, results, summary0 = first_run
    cols = [c for c in results.columns if c != "seconds"]
    pd.testing.assert_frame_equal(shuffled[cols], results[cols])
    pd.testing.assert_frame_equal(summary, summary0)
    _, other_seed, _ = evaluate(case, tmp_path / "seed1", "--seed", 1, "--protocols", "knn")
    knn = results[results.protocol == "knn"].reset_index(drop=True)
    assert not np.allclose(other_seed["auroc"], knn["auroc"])


def test_one_process_or_several_give_the_same_numbers(case, first_run, tmp_path):
    """--jobs 1 (every probe here; k-NN's lists in memory) against the default (worker processes; k-NN's lists
    through .npz files): the same metrics, intervals and differences, to the last digit written."""
    _, results, summary = evaluate(case, tmp_path / "one", "--jobs", 1)
    _, results0, summary0 = first_run
    cols = [c for c in results.columns if c != "seconds"]
    pd.testing.assert_frame_equal(results[cols], results0[cols])
    pd.testing.assert_frame_equal(summary, summary0)


def test_grouped_folds_keep_each_patient_on_one_side():
    rng = np.random.default_rng(0)
    groups, y = rng.integers(0, 40, 300), rng.integers(0, 3, 300)
    folds = make_folds(300, 5, 0, strata=y, groups=groups)
    assert np.array_equal(np.sort(np.concatenate([te for _, te in folds])), np.arange(300))  # each row once
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        assert set(y[te]) == {0, 1, 2}
    split = np.array(["train", "test", "Train"] * 10)
    [(tr, te)] = make_folds(30, 5, 0, split=split)
    assert len(te) == 10 and set(te % 3) == {1}


def test_label_draws_are_nested_per_class_and_reproducible():
    train = np.arange(0, 400, 2)  # training rows of a fold
    strata = np.r_[np.zeros(360, int), np.ones(40, int)]  # 10% positives
    sets = [labelled_rows(train, strata, f, seed=0, fold=1, draw=3) for f in (0.01, 0.1, 0.25, 1.0)]
    for small, large in zip(sets, sets[1:]):
        assert set(small) < set(large)
    assert np.array_equal(sets[-1], train)
    assert np.bincount(strata[sets[0]]).tolist() == [MIN_PER_CLASS, MIN_PER_CLASS]  # 1% of 20 positives < 2
    assert np.bincount(strata[sets[1]]).tolist() == [18, 2]  # the class balance is kept
    assert np.array_equal(sets[1], labelled_rows(train, strata, 0.1, seed=0, fold=1, draw=3))
    assert not np.array_equal(sets[1], labelled_rows(train, strata, 0.1, seed=0, fold=1, draw=4))


def test_weighted_metrics_equal_sklearn_with_sample_weights():
    rng = np.random.default_rng(0)
    w = rng.integers(0, 3, (3, 200)).astype(np.float32)
    y = rng.integers(0, 3, 200)
    p = rng.dirichlet([1, 1, 1], 200)
    p[:50, :2] = np.floor(p[:50, :2] * 10) / 10  # ties, still probabilities
    p[:50, 2] = 1 - p[:50, :2].sum(1)
    m = weighted_metrics("multiclass", y, Run(p, p.argmax(1)), w, ["a", "b", "c"])
    for b in range(3):
        assert abs(m["auroc"][b] - skm.roc_auc_score(y, p, multi_class="ovr", sample_weight=w[b])) < 1e-12
        assert abs(m["auroc_b"][b] - skm.roc_auc_score(y == 1, p[:, 1], sample_weight=w[b])) < 1e-12
        assert abs(m["balanced_accuracy"][b] - skm.balanced_accuracy_score(y, p.argmax(1), sample_weight=w[b])) < 1e-12
    t = rng.normal(size=(200, 1)) * 3 + 50
    pred = t + rng.normal(size=(200, 1))
    m = weighted_metrics("regression", t, Run(pred), w)
    for b in range(3):
        assert abs(m["mae"][b] - skm.mean_absolute_error(t, pred, sample_weight=w[b])) < 1e-9
        assert abs(m["r2"][b] - skm.r2_score(t, pred, sample_weight=w[b])) < 1e-9


def test_group_bootstrap_is_wider_when_patients_repeat():
    rng = np.random.default_rng(0)
    y0 = rng.integers(0, 2, 40)
    s0 = y0 + rng.normal(0, 1.5, 40)
    y, s, groups = np.repeat(y0, 10), np.repeat(s0, 10), np.repeat(np.arange(40), 10)  # 10 scans per patient
    rows = bootstrap("binary", y, [Run(s)], n_boot=400)["auroc"]
    patients = bootstrap("binary", y, [Run(s)], n_boot=400, groups=groups)["auroc"]
    assert rows[0] == patients[0]
    assert patients[2] - patients[1] > 2 * (rows[2] - rows[1])  # 400 rows are really 40 patients


def _bad(case, tmp_path, kind):
    """An input broken the way it breaks in practice; returns (argv, text the one sentence must contain)."""
    t, labels = case["table"].copy(), tmp_path / "labels.csv"
    emb = tmp_path / "emb.npy"
    expect = ""
    if kind == "failed_row":  # main_predict.py could not read one scan: NaN row, its error in the row table
        save_embeddings(emb, t, case["good"], errors={7: "ct_007.nii.gz: truncated gzip stream"})
        expect = "row 8 (line 9) has no finite embedding (main_predict.py: ct_007.nii.gz: truncated gzip stream)"
    else:
        save_embeddings(emb, t, case["good"])
    if kind == "cut_npy":  # copy interrupted
        data = emb.read_bytes()
        emb.write_bytes(data[: len(data) // 2])
        expect = "is not a readable .npy file"
    if kind == "no_rows_file":
        (tmp_path / "emb.npy.rows.csv").unlink()
        expect = "emb.npy.rows.csv is missing"
    if kind == "missing_column":
        t = t.drop(columns="Label")
        expect = "has no column 'Label' (--label_columns)"
    if kind == "unknown_row":
        t.loc[5, "Path"] = "scans/other.nii.gz"
        expect = "has no row for 'scans/other.nii.gz'"
    if kind == "empty_label":
        t.loc[3, "Label"] = ""
        expect = "row 4 (line 5), column 'Label': the label is empty"
    if kind == "rare_class":
        t["Label"] = "0"
        t.loc[[1, 2], "Label"] = "1"
        expect = "class 1 has 2 groups, fewer than --folds 4"
    if kind == "duplicate":
        t.loc[9, "Path"] = t.loc[8, "Path"]
        expect = "row 10 (line 11) repeats the Path 'scans/ct_008.nii.gz'"
    t.to_csv(labels, index=False)
    return ["--embeddings", f"e={emb}", "--labels", labels, "--group_column", "Patient", "--folds", 4,
            "--output_dir", tmp_path / "out"], expect


@pytest.mark.parametrize("kind", ["failed_row", "cut_npy", "no_rows_file", "missing_column", "unknown_row",
                                  "empty_label", "rare_class", "duplicate"])
def test_bad_inputs_stop_with_one_sentence(case, tmp_path, kind):
    argv, expect = _bad(case, tmp_path, kind)
    r = run_in_process("main_evaluate.py", *argv)
    lines = [s for s in r.stderr.splitlines() if s.strip() and not s.startswith(("UserWarning", "FutureWarning"))]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expect in lines[0], lines[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "results.csv").exists()


def test_an_earlier_evaluation_is_kept_without_overwrite(first_run, case):
    r, _, _ = first_run
    out = r.stdout.rsplit("Wrote ", 1)[1].split(", ")[0].rsplit("/", 1)[0]
    before = open(f"{out}/results.csv").read()
    again = run_in_process("main_evaluate.py", "--embeddings", f"good={case['files']['good']}", "--labels",
                           case["dir"] / "labels.csv", "--output_dir", out)
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert open(f"{out}/results.csv").read() == before


@pytest.mark.parametrize("task", ["multiclass", "multilabel", "regression"])
def test_multiclass_multilabel_and_regression_tasks(case, tmp_path, task):
    rng = np.random.default_rng(3)
    t = case["table"][["Path", "Patient"]].copy()
    code = rng.integers(0, 3, N)
    if task == "multiclass":  # text classes, told apart by a numeric column
        t["Label"], t["code"], cols = np.array(["benign", "unclear", "malignant"])[code], code, ["Label"]
    elif task == "multilabel":
        t["A"], t["B"], t["code"], cols = code == 1, code == 2, code, ["A", "B"]
        t[["A", "B"]] = t[["A", "B"]].astype(int)
    else:
        t["Label"] = np.round(rng.normal(50, 10, N), 3)
        t["code"], cols = t["Label"], ["Label"]
    t.to_csv(tmp_path / "labels.csv", index=False)
    r = run_in_process("main_evaluate.py", "--embeddings", f"noise={case['files']['noise']}", "--labels",
                       tmp_path / "labels.csv", "--label_columns", *cols, "--columns", "oracle=code", "--folds", 3,
                       "--label_fractions", 1, "--bootstrap", 50, "--output_dir", tmp_path / "out")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"task {task}" in r.stdout
    res = pd.read_csv(tmp_path / "out" / "results.csv").set_index(["embedding", "protocol"])
    if task == "regression":
        assert res.loc[("oracle", "logreg"), "r2"] > 0.999 and res.loc[("oracle", "logreg"), "mae"] < 0.1
        assert res.loc[("noise", "logreg"), "r2"] < 0.1
    else:
        names = ["benign", "malignant", "unclear"] if task == "multiclass" else ["A", "B"]
        assert all(res.loc[("oracle", "knn"), f"auroc_{n}"] == 1.0 for n in names)
        assert res.loc[("oracle", "knn"), "balanced_accuracy"] == 1.0
        assert 0.35 < res.loc[("noise", "knn"), "auroc"] < 0.65


@pytest.mark.parametrize("where", ["train", "test"])
def test_a_split_without_enough_of_a_class_is_refused(case, tmp_path, where):
    """--split_column with one positive in training (or none in test) used to report AUROC 0.500 [0.500, 0.500]."""
    t = case["table"].copy()
    t["split"] = np.where(np.arange(N) < 120, "train", "test")
    positives = np.flatnonzero(t["Label"] == "1")
    if where == "train":
        t.loc[positives[positives < 120][1:], "split"] = "test"  # one positive row left to learn from
    else:
        t.loc[positives[positives >= 120], "split"] = "train"
    t.to_csv(tmp_path / "labels.csv", index=False)
    r = run_in_process("main_evaluate.py", "--embeddings", f"good={case['files']['good']}", "--labels",
                       tmp_path / "labels.csv", "--split_column", "split", "--output_dir", tmp_path / "out")
    lines = [s for s in r.stderr.splitlines() if s.startswith("error: ")]
    assert r.returncode == 2 and len(lines) == 1, r.stdout[-1000:] + r.stderr
    assert "--split_column split" in lines[0] and "class 1" in lines[0], lines[0]
    assert ("training part has 1 rows" if where == "train" else "test part has no rows") in lines[0]
    assert not (tmp_path / "out" / "results.csv").exists()


def test_lesion_rows_are_told_apart_by_their_point_without_flags(case, tmp_path):
    """Several nodules per scan: Path alone repeats, so coordX/coordY/coordZ join it by default."""
    t = case["table"].copy()
    t["Path"] = [f"scans/ct_{i // 3:03d}.nii.gz" for i in range(N)]
    t["coordX"], t["coordY"], t["coordZ"] = np.arange(N) % 3 * 10.0, -5.5, 12.25
    t.to_csv(tmp_path / "labels.csv", index=False)
    emb = save_embeddings(tmp_path / "good.npy", t, case["good"])
    r = run_in_process("main_evaluate.py", "--embeddings", f"good={emb}", "--labels", tmp_path / "labels.csv",
                       "--protocols", "knn", "--label_fractions", 1, "--bootstrap", 20, "--output_dir", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "identified by its Path and point (Path, coordX, coordY, coordZ)" in r.stdout
    assert pd.read_csv(tmp_path / "o" / "results.csv").auroc.iloc[0] > 0.7


def test_the_picture_counts_labels_and_draws_the_floor_once(case, tmp_path):
    from PIL import Image

    from util.evaluate.report import curve_points

    _, _, summary = evaluate(case, tmp_path, "--label_fractions", 0.01, 0.02, 0.5, 1, "--protocols", "logreg",
                             "--bootstrap", 30)
    floor = summary[summary.fraction < 0.05]
    assert set(floor.n_labelled) == {4}  # 1% and 2% of 60 rows per class both hit 2 per class
    points = curve_points(summary)
    assert len(points) == 3 * 3 and sorted(set(points.n_labelled)) == [4, 61, 120]
    assert points[points.n_labelled == 4].fraction.tolist() == [0.01] * 3
    with Image.open(tmp_path / "label_efficiency.png") as img:
        assert img.size[0] == 520  # one panel: the linear probe
