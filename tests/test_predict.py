"""main_predict.py: demo run, probabilities, embeddings, orientation invariance, bad rows, segmentation, torchrun."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

import main_predict
import models_mae3d
from util.volume.preprocess import PreprocessConfig, load_volume
from tests.bad_inputs import build_bad_files, good_volume
from tests.helpers import run_script
from util.task.meta import RunMeta
import engine_predict as io
from util.checkpoint import save_atomic
from models_build import build_model_from_meta
from util.task.tasks import task_named

SIZE = [32, 32, 32]


def tiny_finetuned(path, mode="multiclass", nb_classes=3, size=SIZE, preprocess=None, seed=0, **meta_extra):
    """Save a tiny finetuned ViT (or UNETR for mode='segmentation') checkpoint as main_finetune.py would."""
    torch.manual_seed(seed)
    labels = ["Label"] if mode in ("multilabel", "regression") else [f"class{k}" for k in range(nb_classes)]
    meta = dict(task="segmentation" if mode == "segmentation" else "classification", mode=mode,
                model="vit_tiny_patch16", nb_classes=nb_classes, nb_outputs=task_named(mode).nb_outputs(nb_classes, 1),
                label_names=labels, input_size=list(size), patch_size=[16, 16, 16], global_pool="avg",
                feature_size=8, **meta_extra)
    model = build_model_from_meta(RunMeta.from_dict(meta))
    with torch.no_grad():  # a random but non-trivial head, so probabilities differ between volumes
        for name, p in model.named_parameters():
            if name.startswith("head."):
                p.normal_(0, 0.5)
    pre = (preprocess or PreprocessConfig(size=tuple(size))).to_dict()
    save_atomic({"model": model.state_dict(), "meta": meta, "preprocess": pre, "args": {}}, path)
    return model


def tiny_mae(path, size=(32, 32, 32), prefix=""):
    """A tiny MAE saved as TANGERINE ships it: {'model': state_dict}, no args, optionally `module.`-prefixed."""
    torch.manual_seed(1)
    mae = models_mae3d.mae_vit_tiny_patch16(img_size=size, decoder_depth=1).eval()
    torch.save({"model": {prefix + k: v for k, v in mae.state_dict().items()}}, path)
    return mae


def predict(*argv) -> int:
    """Run main_predict in this process on CPU, without loader workers unless asked."""
    argv = [str(a) for a in argv]
    extra = [] if "--num_workers" in argv else ["--num_workers", "0"]
    return main_predict.main(main_predict.parse_args([*argv, "--device", "cpu", *extra]))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """Five small CT-like volumes of different shapes and a CSV listing them (relative paths)."""
    root = tmp_path_factory.mktemp("vols")
    names = []
    for k, shape in enumerate([(20, 24, 28), (16, 40, 40), (24, 20, 30), (18, 32, 26), (22, 22, 22)]):
        good_volume(root / f"v{k}.nii.gz", shape=shape, seed=k)
        names.append(f"v{k}.nii.gz")
    pd.DataFrame({"Path": names, "ID": [f"p{k}" for k in range(5)]}).to_csv(root / "in.csv", index=False)
    return root


def test_demo_without_arguments_predicts_every_row_in_order(tmp_path, monkeypatch):
    from util.data.demo import make_demo_data

    monkeypatch.chdir(tmp_path)
    make_demo_data("demo_data", n_pretrain=2, n_labeled=8, seed=0)
    with pytest.raises(FileNotFoundError, match="main_finetune.py"):
        main_predict.main(main_predict.parse_args(["--device", "cpu"]))
    (tmp_path / "output_dir" / "demo_finetune").mkdir(parents=True)
    tiny_finetuned(tmp_path / "output_dir" / "demo_finetune" / "checkpoint-last.pth", "multiclass", 3)
    assert main_predict.main(main_predict.parse_args(["--device", "cpu"])) == 0  # 2 loader workers (preset)
    inp = pd.read_csv("demo_data/predict.csv", dtype=str, keep_default_na=False)
    out = pd.read_csv("output_dir/demo_predict/predictions.csv", dtype={"Path": str, "error": str},
                      keep_default_na=False)
    assert len(out) == len(inp) > 0
    assert list(out["Path"]) == list(inp["Path"])  # every input column kept, input order kept
    assert list(out.columns) == [*inp.columns, "prob_class0", "prob_class1", "prob_class2", "pred", "error"]
    probs = out[["prob_class0", "prob_class1", "prob_class2"]].to_numpy(float)
    assert ((probs >= 0) & (probs <= 1)).all() and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert list(out["pred"]) == [f"class{k}" for k in probs.argmax(1)]
    assert (out["error"] == "").all()


def test_a_label_column_in_the_input_is_scored_and_other_columns_are_not(volumes, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    tiny_finetuned(tmp_path / "bin.pth", "binary", 2)
    table = pd.read_csv(volumes / "in.csv")
    table.assign(Path=[str(volumes / p) for p in table["Path"]], Label=[0, 1, 0, 1, 1], Grade=["a"] * 5).to_csv(
        tmp_path / "labelled.csv", index=False)
    assert predict("--input_csv", tmp_path / "labelled.csv", "--output_csv", tmp_path / "a.csv",
                   "--finetune", tmp_path / "bin.pth") == 0
    out = pd.read_csv(tmp_path / "a.csv")
    acc = np.mean((out["prob_class1"] >= 0.5).astype(int) == out["Label"])
    auroc = roc_auc_score(out["Label"], out["prob_class1"])
    printed = capsys.readouterr().out
    assert f"Against the Label column (5 rows): accuracy {acc:.3f}" in printed and f"AUROC {auroc:.3f}" in printed
    assert predict("--input_csv", tmp_path / "labelled.csv", "--output_csv", tmp_path / "b.csv", "--label_column",
                   "Grade", "--finetune", tmp_path / "bin.pth") == 0
    assert "Against" not in capsys.readouterr().out  # not class indices: nothing to score


def test_binary_probabilities_and_embeddings_from_a_finetuned_classifier(volumes, tmp_path):
    model = tiny_finetuned(tmp_path / "bin.pth", "binary", 2)
    assert predict("--input_csv", volumes / "in.csv", "--output_csv", tmp_path / "a.csv",
                   "--finetune", tmp_path / "bin.pth", "--batch_size", 2) == 0
    assert predict("--input_csv", volumes / "in.csv", "--output_csv", tmp_path / "b.csv", "--embeddings",
                   tmp_path / "e.csv", "--embedding_type", "cat", "--finetune", tmp_path / "bin.pth") == 0
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert np.allclose(a["prob_class0"] + a["prob_class1"], 1, atol=1e-6)
    assert np.allclose(a["prob_class1"], b["prob_class1"], atol=1e-6)  # forward_head(tokens) == forward
    assert a["prob_class1"].std() > 0
    emb = pd.read_csv(tmp_path / "e.csv")
    assert list(emb.columns[:4]) == ["row", "Path", "ID", "error"] and emb.shape[1] == 4 + 2 * 192
    # cat = [class token, mean of patch tokens] of forward_features, on the preprocessed volume
    x = torch.from_numpy(load_volume(str(volumes / "v3.nii.gz"), PreprocessConfig(size=(32, 32, 32))))[None, None]
    with torch.no_grad():
        tokens = model.eval().forward_features(x)[0]
    expect = torch.cat([tokens[0], tokens[1:].mean(0)]).numpy()
    assert np.allclose(emb.loc[3, [f"emb_{k}" for k in range(384)]].to_numpy(float), expect, atol=1e-4)


def test_embeddings_from_tangerine_style_mae_checkpoints(volumes, tmp_path):
    mae = tiny_mae(tmp_path / "mae.pth", size=(32, 32, 48))
    with pytest.raises(ValueError, match="--input_size"):  # a non-cubic grid cannot be inferred
        predict("--input_csv", volumes / "in.csv", "--embeddings", tmp_path / "x.npy", "--finetune", tmp_path / "mae.pth")
    assert predict("--input_csv", volumes / "in.csv", "--embeddings", tmp_path / "e.npy", "--finetune",
                   tmp_path / "mae.pth", "--input_size", 32, 32, 48, "--batch_size", 3) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (5, 192) and emb.dtype == np.float32 and np.isfinite(emb).all()
    rows = pd.read_csv(tmp_path / "e.npy.rows.csv")
    assert list(rows["row"]) == list(range(1, 6)) and list(rows["ID"]) == [f"p{k}" for k in range(5)]
    # avg embedding = mean of the MAE encoder's latent patch tokens (mask ratio 0), whole volume at 32x32x48
    x = torch.from_numpy(load_volume(str(volumes / "v1.nii.gz"), PreprocessConfig(size=(32, 32, 48))))[None, None]
    with torch.no_grad():
        latent = mae.forward_encoder(x, 0.0)[0][0]
    assert np.allclose(emb[1], latent[1:].mean(0).numpy(), atol=1e-4)

    tiny_mae(tmp_path / "ddp.pth", size=(32, 32, 32), prefix="module.")  # DDP prefix, grid inferred (cubic)
    assert predict("--input_csv", volumes / "in.csv", "--embeddings", tmp_path / "c.npy", "--embedding_type", "cls",
                   "--finetune", tmp_path / "ddp.pth") == 0
    assert np.load(tmp_path / "c.npy").shape == (5, 192)
    with pytest.raises(ValueError, match="--embeddings"):  # a pretraining checkpoint has no head to predict with
        predict("--input_csv", volumes / "in.csv", "--output_csv", tmp_path / "p.csv", "--finetune", tmp_path / "ddp.pth")
    parquet = ["--input_csv", volumes / "in.csv", "--embeddings", tmp_path / "e.parquet", "--finetune",
               tmp_path / "ddp.pth"]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pyarrow"):
            predict(*parquet)
    else:
        assert predict(*parquet) == 0 and pd.read_parquet(tmp_path / "e.parquet").shape == (5, 4 + 192)


def _same_scan_three_ways(root) -> list[str]:
    """One scan stored as LPS, as RAS (x and y flipped) and with x/z swapped; physical space identical."""
    rng = np.random.default_rng(0)
    arr = np.kron(rng.normal(0, 400, size=(5, 6, 7)), np.ones((4, 4, 4)))[:18, :22, :26].astype(np.float32)
    lps = sitk.GetImageFromArray(arr)
    lps.SetSpacing((1.5, 1.25, 2.0))
    lps.SetOrigin((-10.0, 20.0, 5.0))
    ras = sitk.GetImageFromArray(np.ascontiguousarray(arr[:, ::-1, ::-1]))
    ras.SetSpacing(lps.GetSpacing())
    ras.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    ras.SetOrigin(lps.TransformIndexToPhysicalPoint((arr.shape[2] - 1, arr.shape[1] - 1, 0)))
    swapped = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    swapped.SetSpacing((2.0, 1.25, 1.5))
    swapped.SetDirection((0, 0, 1, 0, 1, 0, 1, 0, 0))
    swapped.SetOrigin(lps.GetOrigin())
    paths = []
    for name, img in (("lps", lps), ("ras", ras), ("swapped", swapped)):
        back = sitk.Resample(img, lps, sitk.Transform(), sitk.sitkNearestNeighbor)
        assert np.array_equal(sitk.GetArrayFromImage(back), arr)  # the copies really are the same scan
        sitk.WriteImage(img, str(root / f"{name}.nii.gz"))
        paths.append(str(root / f"{name}.nii.gz"))
    return paths


def test_checkpoint_preprocessing_is_used_unless_a_flag_is_typed():
    saved = PreprocessConfig(size=(32, 32, 32), window=(-1000.0, 400.0), orientation="RAS")
    meta = RunMeta.from_dict({"mode": "multiclass", "model": "vit_tiny_patch16", "input_size": [32, 32, 32],
                              "nb_classes": 3, "nb_outputs": 3})
    flags = ["--input_csv", "x.csv", "--output_csv", "p.csv", "--finetune", "c.pth"]
    cfg = main_predict.preprocess_config(saved, meta, main_predict.parse_args(flags))
    assert tuple(cfg.window) == (-1000.0, 400.0) and cfg.orientation == "RAS"
    typed = main_predict.parse_args([*flags, "--window", "-500", "500"])
    cfg = main_predict.preprocess_config(saved, meta, typed)
    assert tuple(cfg.window) == (-500.0, 500.0) and cfg.orientation == "RAS"
    tangerine = main_predict.preprocess_config(None, meta, main_predict.parse_args(flags))
    assert tangerine.to_dict() == PreprocessConfig(size=(32, 32, 32)).to_dict()


def test_output_columns_name_classes_labels_and_regression_targets():
    df = pd.DataFrame({"Path": ["a.nii.gz", "b.nii.gz"], "Site": ["x", "y"]})
    results = {0: {"probs": np.array([0.9, 0.2], np.float32)}, 1: {"error": "b.nii.gz: file not found."}}
    common = dict(model="vit_tiny_patch16", input_size=[32, 32, 32])
    multilabel = RunMeta.from_dict({"mode": "multilabel", "nb_classes": 2, "nb_outputs": 2,
                                    "label_names": ["Nodule", "Emphysema"], **common})
    t = io.prediction_table(df, results, multilabel)
    assert list(t.columns) == ["Path", "Site", "prob_Nodule", "prob_Emphysema", "pred", "error"]
    assert t.loc[0, "pred"] == "Nodule" and t.loc[1, "pred"] == "" and np.isnan(t.loc[1, "prob_Nodule"])
    regression = RunMeta.from_dict({"mode": "regression", "nb_classes": 0, "nb_outputs": 2,
                                    "label_names": ["Age", "BMI"], **common})
    t = io.prediction_table(df, results, regression)
    assert list(t.columns) == ["Path", "Site", "pred_Age", "pred_BMI", "error"] and np.isclose(t.loc[0, "pred_BMI"], 0.2)
    binary = RunMeta.from_dict({"mode": "binary", "nb_classes": 2, "nb_outputs": 1, "label_names": ["0", "1"],
                                **common})
    assert binary.output_columns == ["0", "1"]
    assert io.seg_output_paths(["a/ct.nii.gz", "b/ct.nii.gz", "c/lung.nrrd"], "m") == [
        "m/ct_row1_seg.nii.gz", "m/ct_row2_seg.nii.gz", "m/lung_seg.nii.gz"]


def test_same_scan_in_other_orientations_gives_the_same_embedding(tmp_path):
    paths = _same_scan_three_ways(tmp_path)
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        sitk.ReadImage(paths[1]).GetDirection()) == "RAS"
    pd.DataFrame({"Path": paths}).to_csv(tmp_path / "in.csv", index=False)
    tiny_mae(tmp_path / "mae.pth")
    assert predict("--input_csv", tmp_path / "in.csv", "--embeddings", tmp_path / "e.npy", "--embedding_type", "cat",
                   "--finetune", tmp_path / "mae.pth") == 0
    emb = np.load(tmp_path / "e.npy")
    assert np.abs(emb[0]).max() > 0.1
    assert np.allclose(emb[1], emb[0], atol=1e-4) and np.allclose(emb[2], emb[0], atol=1e-4)


@pytest.fixture(scope="module")
def bad_table(tmp_path_factory):
    """Good rows with a missing file, a truncated .nii.gz, a 2D, a 4D and a NaN volume among them."""
    root = tmp_path_factory.mktemp("bad")
    bad = build_bad_files(root / "bad")
    nan = np.zeros((16, 24, 24), np.float32)
    nan[3, 4, 5] = np.nan
    bad["nan"] = root / "bad" / "nan_voxels.nrrd"  # NRRD: SimpleITK's NIfTI reader turns NaN into 0
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(bad["nan"]))
    for k in range(3):
        good_volume(root / f"good{k}.nii.gz", shape=(16, 24, 24), seed=k)
    rows = ["good0.nii.gz", str(bad["missing"]), "good1.nii.gz", str(bad["truncated"]), str(bad["2d"]),
            str(bad["4d"]), str(bad["nan"]), "good2.nii.gz"]
    pd.DataFrame({"Path": rows}).to_csv(root / "in.csv", index=False)
    tiny_finetuned(root / "clf.pth", "multiclass", 3)
    return root


def test_bad_rows_get_an_error_and_the_others_are_predicted(bad_table, tmp_path):
    code = predict("--input_csv", bad_table / "in.csv", "--output_csv", tmp_path / "out.csv", "--embeddings",
                   tmp_path / "e.npy", "--finetune", bad_table / "clf.pth", "--num_workers", 2, "--batch_size", 3)
    assert code == 2
    out = pd.read_csv(tmp_path / "out.csv", dtype={"error": str, "pred": str}, keep_default_na=False)
    good = [0, 2, 7]
    assert len(out) == 8 and (out.loc[good, "error"] == "").all()
    assert all(out.loc[i, "error"] and out.loc[i, "pred"] == "" and out.loc[i, "prob_class0"] == ""
               for i in range(8) if i not in good)
    assert all(out.loc[i, "error"].count(". ") == 0 for i in range(8))  # one sentence each
    assert "does_not_exist" in out.loc[1, "error"] and "truncated" in out.loc[3, "error"]
    assert np.allclose(out.loc[good, ["prob_class0", "prob_class1", "prob_class2"]].astype(float).sum(1), 1)
    emb = np.load(tmp_path / "e.npy")
    assert np.isfinite(emb[good]).all() and np.isnan(np.delete(emb, good, axis=0)).all()
    rows = pd.read_csv(tmp_path / "e.npy.rows.csv", keep_default_na=False)
    assert list(rows["error"] != "") == [i not in good for i in range(8)]


def test_strict_stops_at_the_first_failure_with_a_message_naming_the_row(bad_table, tmp_path, capsys):
    code = predict("--input_csv", bad_table / "in.csv", "--output_csv", tmp_path / "out.csv", "--finetune",
                   bad_table / "clf.pth", "--strict", "--batch_size", 1)
    err = capsys.readouterr().err
    assert code == 2 and "Row 2 (" in err and "does_not_exist" in err and "--strict" in err
    assert not (tmp_path / "out.csv").exists()


def test_existing_output_is_kept_without_overwrite_and_unsafe_checkpoints_are_refused(volumes, tmp_path):
    tiny_finetuned(tmp_path / "clf.pth")
    out = tmp_path / "out.csv"
    out.write_text("keep\n")
    args = ["--input_csv", volumes / "in.csv", "--output_csv", out, "--finetune", tmp_path / "clf.pth"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        predict(*args)
    assert out.read_text() == "keep\n"
    assert predict(*args, "--overwrite") == 0 and len(pd.read_csv(out)) == 5
    assert not list(tmp_path.glob(".tmp*"))
    from tests.helpers import make_hostile_checkpoint

    make_hostile_checkpoint(tmp_path / "pickled.pth", tmp_path / "code_ran")
    with pytest.raises(ValueError, match="unsafe"):
        predict("--input_csv", volumes / "in.csv", "--output_csv", tmp_path / "o2.csv", "--finetune",
                tmp_path / "pickled.pth")
    assert not (tmp_path / "code_ran").exists()


def test_segmentation_label_map_lands_on_the_input_grid(shared_data, tmp_path):
    ct = shared_data / "totalseg" / "example_ct.nii.gz"
    pd.DataFrame({"Path": [str(ct), str(tmp_path / "missing.nii.gz")]}).to_csv(tmp_path / "in.csv", index=False)
    # 9 mm spacing: the preprocessed grid (about 37x34x41) is larger than the 32^3 window -> sliding window
    tiny_finetuned(tmp_path / "seg.pth", "segmentation", 3, preprocess=PreprocessConfig(size=(32, 32, 32),
                                                                                         spacing=(9.0, 9.0, 9.0)))
    code = predict("--input_csv", tmp_path / "in.csv", "--output_csv", tmp_path / "out.csv", "--finetune",
                   tmp_path / "seg.pth", "--seg_output_dir", tmp_path / "masks", "--batch_size", 4)
    assert code == 2  # the missing row
    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert out.loc[0, "seg_path"] == str(tmp_path / "masks" / "example_ct_seg.nii.gz") and out.loc[0, "error"] == ""
    assert out.loc[1, "seg_path"] == "" and "missing" in out.loc[1, "error"]
    img, seg = sitk.ReadImage(str(ct)), sitk.ReadImage(out.loc[0, "seg_path"])
    assert seg.GetSize() == img.GetSize()
    assert np.allclose(seg.GetSpacing(), img.GetSpacing(), atol=1e-5)
    assert np.allclose(seg.GetOrigin(), img.GetOrigin(), atol=1e-4)
    assert np.allclose(seg.GetDirection(), img.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayViewFromImage(seg))) <= {0, 1, 2}


def test_two_torchrun_ranks_write_the_same_csv_as_one_process(volumes, tmp_path):
    tiny_finetuned(tmp_path / "clf.pth", "multiclass", 3)
    rows = [str(volumes / f"v{k}.nii.gz") for k in range(5)]
    rows.insert(2, str(tmp_path / "missing.nii.gz"))  # 6 rows, one bad: uneven work per rank
    pd.DataFrame({"Path": rows, "n": range(6)}).to_csv(tmp_path / "in.csv", index=False)
    common = ["--input_csv", tmp_path / "in.csv", "--finetune", tmp_path / "clf.pth", "--batch_size", 2]
    assert predict(*common, "--output_csv", tmp_path / "one.csv", "--embeddings", tmp_path / "one.npy") == 2
    two = [*common, "--output_csv", tmp_path / "two.csv", "--embeddings", tmp_path / "two.npy", "--num_workers", 1,
           "--device", "cpu", "--overwrite"]
    r = run_script("main_predict.py", *two, torchrun=2)
    assert r.returncode == 0 and "1 of 6 rows failed" in r.stderr, r.stderr[-3000:]  # complete: no crash report
    assert "ChildFailedError" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    status = json.loads((tmp_path / "two.csv.exit_status.json").read_text())  # beside the output it belongs to
    assert status["status"] == 2  # the status a job script reads
    one, two = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "two.csv")
    probs = [c for c in one.columns if c.startswith("prob_")]
    assert list(one.columns) == list(two.columns) and len(two) == 6
    assert one.drop(columns=probs).equals(two.drop(columns=probs))
    assert np.allclose(one[probs].to_numpy(float), two[probs].to_numpy(float), atol=1e-6, equal_nan=True)
    assert np.allclose(np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy"), atol=1e-5, equal_nan=True)


def test_segmentation_with_a_mask_column_reports_dice_per_row_and_its_mean(volumes, tmp_path, capsys):
    tiny_finetuned(tmp_path / "seg.pth", "segmentation", 3)
    vol = str(volumes / "v1.nii.gz")
    pd.DataFrame({"Path": [vol]}).to_csv(tmp_path / "first.csv", index=False)
    assert predict("--input_csv", tmp_path / "first.csv", "--output_csv", tmp_path / "first_out.csv", "--finetune",
                   tmp_path / "seg.pth") == 0
    label = sitk.ReadImage(str(tmp_path / "first_out_seg" / "v1_seg.nii.gz"))
    pred = sitk.GetArrayFromImage(label)
    assert (pred > 0).any()
    truth = pred.copy()
    truth[: truth.shape[0] // 2] = 0  # half of the prediction's foreground is wrong
    half = sitk.GetImageFromArray(truth)
    half.CopyInformation(label)
    sitk.WriteImage(half, str(tmp_path / "half.nii.gz"))
    expected = np.nanmean([2 * ((pred == c) & (truth == c)).sum() / ((pred == c).sum() + (truth == c).sum())
                           if ((pred == c).sum() + (truth == c).sum()) else np.nan for c in (1, 2)])
    masks = [str(tmp_path / "first_out_seg" / "v1_seg.nii.gz"), str(tmp_path / "half.nii.gz"), "missing.nii.gz"]
    pd.DataFrame({"Path": [vol] * 3, "Mask": masks}).to_csv(tmp_path / "in.csv", index=False)
    capsys.readouterr()
    assert predict("--input_csv", tmp_path / "in.csv", "--output_csv", tmp_path / "out.csv", "--finetune",
                   tmp_path / "seg.pth") == 0  # a mask that cannot be read costs its Dice, not the prediction
    out = pd.read_csv(tmp_path / "out.csv")
    assert list(out.columns) == ["Path", "Mask", "seg_path", "dice", "error"]
    assert out.loc[0, "dice"] == pytest.approx(1.0) and out.loc[1, "dice"] == pytest.approx(expected, abs=1e-6)
    assert 0.3 < expected < 0.9 and np.isnan(out.loc[2, "dice"]) and out["error"].isna().all()
    printed = capsys.readouterr().out
    assert f"Against the Mask column (2 rows): mean Dice {(1.0 + expected) / 2:.3f}" in printed
    assert "Dice not computed for 1 rows; first: row 3:" in printed and "missing.nii.gz" in printed
