"""Every volume, table and checkpoint a script reads is checked for what would make its numbers wrong.

Broken the way files break in practice: bytes flipped inside a gzip stream, cut copies, a detached data file left
behind, a zero spacing, a DICOM slice that does not read, CSV rows ending with a delimiter, NaN weights.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import SimpleITK as sitk
import torch

import models_mae3d
import models_vit3d
from models_build import adopt_encoder, build_model_from_meta
from tests.bad_inputs import cut_file, flip_bytes, good_volume, zero_spacing
from tests.helpers import run_in_process
from util.checkpoint import NonFiniteCheckpointError, load_checkpoint, save_atomic
from util.nn.registry import ModelSpec
from util.task.meta import RunMeta
from util.task.record import find_resume, read_record
from util.volume.preprocess import PreprocessConfig
from util.errors import UserError
from util.data.path_table import read_csv_table, read_path_table
from util.volume.io import VolumeError, read_image


def refusal(path) -> str:
    with pytest.raises(VolumeError) as e:
        read_image(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    return msg


# ---- volumes ---------------------------------------------------------------------------------------------------

def test_bytes_flipped_inside_a_compressed_volume_fail_its_checksum(tmp_path):
    """SimpleITK reads such a .nii.gz or compressed .mha with about half its voxels wrong and no error."""
    big = good_volume(tmp_path / "ct.nii.gz", shape=(48, 80, 80))
    mha = tmp_path / "ct.mha"
    sitk.WriteImage(sitk.ReadImage(str(big)), str(mha), True)  # zlib-compressed MetaImage
    for src in (big, mha):
        bad = flip_bytes(src, tmp_path / f"flipped_{src.name}")
        assert bad.stat().st_size == src.stat().st_size
        msg = refusal(bad)
        assert "fails its check" in msg and "copy the file again" in msg
    assert sitk.GetArrayFromImage(read_image(big)).shape == (48, 80, 80)  # the intact file still reads


@pytest.mark.parametrize("name,compress", [("v.nii", False), ("v.nii.gz", False), ("v.mha", False),
                                           ("v.mha", True)])
def test_a_cut_copy_is_called_truncated_with_what_it_holds(tmp_path, name, compress):
    src = tmp_path / name
    sitk.WriteImage(sitk.ReadImage(str(good_volume(tmp_path / "g.nii", shape=(16, 32, 32)))), str(src), compress)
    msg = refusal(cut_file(src, tmp_path / f"cut_{name}"))
    assert "truncated" in msg and ("holds" in msg or "ends early" in msg) and "No such file" not in msg


def test_a_missing_data_file_and_a_zero_spacing_are_named_as_such(tmp_path):
    hdr = tmp_path / "scan.mhd"
    sitk.WriteImage(sitk.ReadImage(str(good_volume(tmp_path / "g.nii", shape=(8, 12, 12)))), str(hdr))
    (tmp_path / "scan.raw").unlink()
    msg = refusal(hdr)
    assert f"the data file {tmp_path / 'scan.raw'} named by its header is missing" in msg
    for path in zero_spacing(tmp_path).values():  # ITK: "corrupt" for the .mha, 1 mm for the NIfTI
        assert "has spacing 0 in its header (0 x 1.5 x 2 mm)" in refusal(path)


@pytest.fixture()
def dicom_copy(shared_data, tmp_path) -> Path:
    """A writable copy of the real 20-slice DICOM series (0.98 x 0.98 x 2 mm)."""
    folder = tmp_path / "series"
    shutil.copytree(shared_data / "totalseg" / "example_ct_dicom", folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


def test_a_dicom_series_with_an_unreadable_or_missing_slice_is_refused(dicom_copy):
    img = read_image(dicom_copy)
    assert img.GetSize()[2] == 20 and img.GetSpacing()[2] == pytest.approx(2.0, abs=1e-3)
    middle = sorted(dicom_copy.iterdir())[10]
    cut_file(middle, middle, keep=0.01)  # a slice cut during the copy: GDCM leaves it out of the series
    msg = refusal(dicom_copy)
    assert f"its DICOM file {middle.name} cannot be read" in msg
    middle.unlink()  # the slice gone altogether: ITK would read 19 slices at 2.11 mm
    msg = refusal(dicom_copy)
    assert re.search(r"its 19 DICOM slices are not evenly spaced \(4 mm between slices (9 and 10|10 and 11), 2 mm "
                     r"elsewhere\); a slice is missing", msg)


# ---- tables ----------------------------------------------------------------------------------------------------

def test_rows_ending_with_a_delimiter_keep_their_columns(tmp_path):
    for k in range(2):
        good_volume(tmp_path / f"v{k}.nii.gz", shape=(8, 12, 12))
    csv = tmp_path / "t.csv"
    csv.write_text("Path,Label\nv0.nii.gz,1,\nv1.nii.gz,0,\n")  # as some exporters write every row
    df = read_path_table(csv, ("Path", "Label"))
    assert [Path(p).name for p in df["Path"]] == ["v0.nii.gz", "v1.nii.gz"] and list(df["Label"]) == [1, 0]
    csv.write_text("Path,Label\nv0.nii.gz,1\nv1.nii.gz,0,7\n")  # a value under no column: refused, never shifted
    with pytest.raises(UserError, match=r"row 2 \(line 3\) has 3 fields but the header has 2 \('7' is under no"):
        read_csv_table(csv)


# ---- checkpoints -----------------------------------------------------------------------------------------------

def tiny_classifier(path: Path, nan_key: str | None = None) -> Path:
    meta = dict(task="classification", mode="multiclass", model="vit_tiny_patch16", nb_classes=3, nb_outputs=3,
                label_names=["a", "b", "c"], input_size=[32, 32, 32], patch_size=[16, 16, 16], global_pool="avg")
    torch.manual_seed(0)
    sd = build_model_from_meta(RunMeta.from_dict(meta)).state_dict()
    if nan_key:
        sd[nan_key][0, 0] = float("nan")
    save_atomic({"model": sd, "meta": meta, "args": {}}, path)
    return path


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_key(tmp_path):
    ckpt = tiny_classifier(tmp_path / "nan.pth", nan_key="blocks.3.mlp.fc1.weight")
    with pytest.raises(NonFiniteCheckpointError, match=r"holds NaN or infinite values in 'model\.blocks\.3\.mlp"):
        load_checkpoint(ckpt)
    good_volume(tmp_path / "v.nii.gz", shape=(16, 24, 24))
    (tmp_path / "in.csv").write_text("Path\nv.nii.gz\n")
    r = run_in_process("main_predict.py", "--input_csv", tmp_path / "in.csv", "--output_csv", tmp_path / "out.csv",
                       "--finetune", ckpt, "--device", "cpu", "--num_workers", 0)
    assert r.returncode == 2 and f"error: Checkpoint {ckpt} holds NaN" in r.stderr
    assert not (tmp_path / "out.csv").exists()


def test_resume_skips_a_checkpoint_with_inf_weights(tmp_path):
    for name, epoch in (("checkpoint-0.pth", 0), ("checkpoint-last.pth", 1)):
        sd = {"w": torch.ones(3)}
        if epoch == 1:
            sd["w"][1] = float("inf")
        save_atomic({"model": sd, "epoch": epoch, "optimizer": {}}, tmp_path / name)
    path, rec = find_resume(tmp_path)
    assert Path(path).name == "checkpoint-0.pth" and rec.epoch == 0


def test_a_bit_flipped_volume_in_a_table_with_trailing_delimiters_is_that_rows_error(tmp_path):
    """Through main_predict: every Path stays a path, the flipped volume's row names the failed check."""
    good_volume(tmp_path / "good.nii.gz", shape=(16, 24, 24))
    flip_bytes(good_volume(tmp_path / "src.nii.gz", shape=(48, 80, 80)), tmp_path / "rot.nii.gz")
    (tmp_path / "in.csv").write_text("Path,ID\ngood.nii.gz,p0,\nrot.nii.gz,p1,\n")
    ckpt = tiny_classifier(tmp_path / "clf.pth")
    r = run_in_process("main_predict.py", "--input_csv", tmp_path / "in.csv", "--output_csv", tmp_path / "out.csv",
                       "--finetune", ckpt, "--device", "cpu", "--num_workers", 0)
    out = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)
    assert r.returncode == 2 and list(out["Path"]) == ["good.nii.gz", "rot.nii.gz"] and list(out["ID"]) == ["p0", "p1"]
    assert out.loc[0, "error"] == "" and "fails its check" in out.loc[1, "error"]


def test_a_segmentation_checkpoint_initialises_a_vit_from_its_encoder(tmp_path):
    meta = dict(task="segmentation", mode="segmentation", model="vit_tiny_patch16", nb_classes=2, nb_outputs=2,
                label_names=["0", "1"], input_size=[32, 32, 32], patch_size=[16, 16, 16], feature_size=8)
    torch.manual_seed(0)
    seg = build_model_from_meta(RunMeta.from_dict(meta))
    save_atomic({"model": seg.state_dict(), "meta": meta}, tmp_path / "seg.pth")
    vit = models_vit3d.vit_tiny_patch16(img_size=32, patch_size=16, num_classes=2)
    info = models_vit3d.load_pretrained_encoder(vit, tmp_path / "seg.pth", verbose=False)
    assert len([k for k in info["loaded"] if k.startswith("blocks.")]) == 12 * 12  # 12 blocks of 12 tensors
    assert torch.equal(vit.blocks[11].mlp.fc2.weight, seg.encoder.blocks[11].mlp.fc2.weight)


def test_finetune_takes_patch_size_and_width_from_the_checkpoint_unless_typed(tmp_path, capsys):
    torch.manual_seed(0)
    mae = models_mae3d.mae_vit_small_patch16(img_size=32, patch_size=8, decoder_depth=1)
    torch.save({"model": mae.state_dict()}, tmp_path / "mae_p8.pth")
    rec, path = read_record(tmp_path / "mae_p8.pth"), str(tmp_path / "mae_p8.pth")
    spec, pre = ModelSpec("vit_large_patch16", 32, 16), PreprocessConfig(size=(32, 32, 32))
    got, _ = adopt_encoder(rec, spec, pre, frozenset(), path)
    assert got.name == "vit_small_patch16" and got.patch_size == (8, 8, 8)
    assert "its encoder sets --model vit_small_patch16, --patch_size 8 8 8" in capsys.readouterr().out
    typed, _ = adopt_encoder(rec, ModelSpec("vit_base_patch16", 32, 16), pre, frozenset({"model", "patch_size"}), path)
    assert typed.name == "vit_base_patch16" and typed.patch_size == (16, 16, 16)


def test_main_finetune_of_a_patch_8_encoder_runs_without_patch_flags(tmp_path):
    """The README says the encoder is recognised from the weights: before, this stopped on a (192, 1, 8, 8, 8)
    versus (192, 1, 16, 16, 16) shape mismatch."""
    torch.manual_seed(0)
    mae = models_mae3d.mae_vit_tiny_patch16(img_size=32, patch_size=8, decoder_depth=1)
    torch.save({"model": mae.state_dict()}, tmp_path / "mae_p8.pth")
    for k in range(4):
        good_volume(tmp_path / f"v{k}.nii.gz", shape=(12, 16, 16), seed=k)
    (tmp_path / "train.csv").write_text("Path,Label\n" + "".join(f"v{k}.nii.gz,{k % 2}\n" for k in range(4)))
    r = run_in_process("main_finetune.py", "--train_csv", tmp_path / "train.csv", "--output_dir", tmp_path / "out",
                       "--finetune", tmp_path / "mae_p8.pth", "--input_size", 32, "--epochs", 1, "--warmup_epochs", 0,
                       "--batch_size", 2, "--num_workers", 0, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "its encoder sets --model vit_tiny_patch16, --patch_size 8 8 8" in r.stdout
    meta = load_checkpoint(tmp_path / "out" / "checkpoint-last.pth")["meta"]
    assert meta["model"] == "vit_tiny_patch16" and meta["patch_size"] == [8, 8, 8]
