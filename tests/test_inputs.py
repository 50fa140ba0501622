"""Inputs made by other tools: Excel CSVs (Windows-1252, semicolons), spaced headers, empty label cells, an
Enhanced-CT DICOM folder (one multi-frame file), and errors raised inside DataLoader workers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from tests.bad_inputs import good_volume
from tests.helpers import run_in_process
from util.data.path_table import read_path_table
from engine_predict import read_input_table
from util.volume.io import read_image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "patiënt").mkdir()  # a non-ASCII folder name, as Excel users have them
    for k in range(4):
        good_volume(root / "patiënt" / f"v{k}.nii.gz", shape=(16, 20, 24), seed=k)
    return root


def test_excel_csvs_read_the_same_in_training_and_prediction(folder):
    rows = [f"patiënt/v{k}.nii.gz;{k % 2}" for k in range(4)]
    (folder / "excel.csv").write_bytes(("Path ; Label\r\n" + "\r\n".join(rows) + "\r\n").encode("cp1252"))
    with pytest.warns(UserWarning, match="Windows-1252"):
        train = read_path_table(folder / "excel.csv", ("Path", "Label"))
    assert list(train["Label"]) == [0, 1, 0, 1] and train["Path"].iloc[1].endswith("patiënt/v1.nii.gz")
    with pytest.warns(UserWarning, match="Windows-1252"):
        df, paths = read_input_table(str(folder / "excel.csv"))
    assert paths == list(train["Path"]) and list(df.columns) == ["Path", "Label"]  # spaces around names stripped
    (folder / "spaced.csv").write_text("Path , Label\n" + "\n".join(r.replace(";", ",") for r in rows) + "\n")
    assert read_input_table(str(folder / "spaced.csv"))[1] == paths
    assert list(read_path_table(folder / "spaced.csv", ("Path", "Label"))["Path"]) == paths


def test_an_empty_label_cell_is_called_empty(folder, tmp_path):
    (folder / "gap.csv").write_text("Path,Label\npatiënt/v0.nii.gz,0\npatiënt/v1.nii.gz,\npatiënt/v2.nii.gz,1\n"
                                    "patiënt/v3.nii.gz,0\n")
    r = run_in_process("main_finetune.py", "--train_csv", folder / "gap.csv", "--model", "vit_tiny_patch16",
                       "--input_size", 16, "--device", "cpu", "--num_workers", 0, "--batch_size", 2,
                       "--output_dir", tmp_path / "f")
    err = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1, r.stderr[-2000:]
    assert "gap.csv" in err[0] and "row 2 (line 3)" in err[0] and "column 'Label'" in err[0] and "empty" in err[0]
    assert "nan" not in err[0]


def test_a_dicom_folder_holding_one_multi_frame_file_loads_like_the_file(tmp_path):
    arr = (np.random.default_rng(0).random((12, 20, 24)) * 2000).astype(np.uint16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.0))
    (tmp_path / "enhanced").mkdir()
    sitk.WriteImage(img, str(tmp_path / "enhanced" / "IM0001.dcm"))
    from_folder, from_file = read_image(tmp_path / "enhanced"), read_image(tmp_path / "enhanced" / "IM0001.dcm")
    assert from_folder.GetSize() == (24, 20, 12) and from_folder.GetSpacing() == from_file.GetSpacing()
    assert np.array_equal(sitk.GetArrayFromImage(from_folder), arr)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_mask_reads_the_same_with_or_without_loader_workers(folder, tmp_path, workers):
    mask = sitk.GetImageFromArray(np.full((16, 20, 24), 7, np.uint8))  # label 7 in a 2-class task
    img = read_image(folder / "patiënt" / "v0.nii.gz")
    mask.CopyInformation(img)
    sitk.WriteImage(mask, str(tmp_path / "m.nii.gz"))
    pd.DataFrame({"Path": [str(folder / "patiënt" / f"v{k}.nii.gz") for k in range(2)],
                  "Mask": [str(tmp_path / "m.nii.gz")] * 2}).to_csv(tmp_path / "seg.csv", index=False)
    r = run_in_process("main_finetune.py", "--task", "segmentation", "--train_csv", tmp_path / "seg.csv",
                       "--model", "vit_tiny_patch16", "--input_size", 16, "--device", "cpu", "--num_workers",
                       workers, "--batch_size", 2, "--epochs", 1, "--output_dir", tmp_path / "f", "--feature_size",
                       8)
    err = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1, r.stderr[-2000:]
    assert err[0] == f"error: {tmp_path / 'm.nii.gz'}: holds label values 7..7; expected 0..1 (pass nb_classes to " \
                     f"the dataset, --nb_classes to the script)."


def test_home_relative_paths_resolve_the_same_in_training_and_prediction(folder, monkeypatch):
    monkeypatch.setenv("HOME", str(folder))
    (folder / "home.csv").write_text("Path,Label\n" + "\n".join(f"~/patiënt/v{k}.nii.gz,{k % 2}" for k in range(4)))
    train = list(read_path_table(folder / "home.csv", ("Path", "Label"))["Path"])
    assert train[0] == str(folder / "patiënt" / "v0.nii.gz") and read_input_table(str(folder / "home.csv"))[1] == train
