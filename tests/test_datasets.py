"""Path tables, augmentation and the two Custom3DDataset classes (pretraining and finetuning)."""
from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

import datasets_three_d_fine as fine
from datasets_three_d import Custom3DDataset
from util.data.augment import Augment3D, center_crop_or_pad, random_crop
from util.data.path_table import read_path_table
from util.volume.preprocess import PreprocessConfig
from tests.bad_inputs import build_bad_files


def write_volume(path: Path, shape=(12, 20, 24), seed=0, cube=True) -> tuple[Path, Path]:
    """A -1000 HU volume with a random-sized 300 HU box, and its mask (box = 1); 2 x 1.5 x 3 mm voxels."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000, np.int16)
    mask = np.zeros(shape, np.uint8)
    lo = [int(rng.integers(1, n // 2)) for n in shape]
    sl = tuple(slice(a, a + int(rng.integers(3, n // 2))) for a, n in zip(lo, shape))
    if cube:
        hu[sl], mask[sl] = 300, 1
    mpath = path.with_name(path.name.replace(".nii.gz", "_mask.nii.gz"))
    for arr, p in ((hu, path), (mask, mpath)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((2.0, 1.5, 3.0))
        sitk.WriteImage(img, str(p))
    return path, mpath


@pytest.fixture()
def table(tmp_path) -> Path:
    """train.csv (relative paths) with 4 volumes, masks and label columns."""
    (tmp_path / "vols").mkdir()
    rows = []
    for i in range(4):
        img, mask = write_volume(tmp_path / "vols" / f"v{i}.nii.gz", seed=i)
        rows.append(dict(Path=f"vols/{img.name}", Mask=f"vols/{mask.name}", Label=i % 3, A=i % 2, B=1 - i % 2,
                         Size=0.5 * i))
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    return tmp_path / "train.csv"


def test_path_table_resolves_relative_paths_and_accepts_lowercase_and_text_lists(table, tmp_path):
    df = read_path_table(table)
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in df["Path"]) and list(df.index) == [2, 3, 4, 5]
    pd.read_csv(table).rename(columns={"Path": "path"}).to_csv(tmp_path / "lower.csv", index=False)
    assert list(read_path_table(tmp_path / "lower.csv")["Path"]) == list(df["Path"])
    (tmp_path / "list.txt").write_text("# volumes\n" + "\n".join(f"vols/v{i}.nii.gz" for i in range(4)) + "\n\n")
    assert list(read_path_table(tmp_path / "list.txt")["Path"]) == list(df["Path"])
    odd = os.path.join(os.path.dirname(df["Path"].iloc[0]), "v0,copy;1.nii.gz")  # a list line is one path
    shutil.copy(df["Path"].iloc[0], odd)
    (tmp_path / "odd.lst").write_text(odd + "\n" + df["Path"].iloc[1] + "\n")
    assert list(read_path_table(tmp_path / "odd.lst")["Path"]) == [odd, df["Path"].iloc[1]]


def test_path_table_errors_name_the_file_row_and_column(table, tmp_path):
    (tmp_path / "nopath.csv").write_text("File,Label\nvols/v0.nii.gz,1\n")
    with pytest.raises(ValueError, match=r"nopath\.csv: has no 'Path' column \(columns: File, Label\)"):
        read_path_table(tmp_path / "nopath.csv")
    (tmp_path / "gone.csv").write_text("Path\nvols/v0.nii.gz\nvols/v9.nii.gz\n")
    with pytest.raises(FileNotFoundError, match=r"gone\.csv: row 2 \(line 3\), column Path: .*v9\.nii\.gz does not"):
        read_path_table(tmp_path / "gone.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv: is empty"):
        read_path_table(tmp_path / "empty.csv")
    (tmp_path / "blank.csv").write_text("Path,Label\nvols/v0.nii.gz,1\n,0\n")
    with pytest.raises(ValueError, match=r"row 2 \(line 3\) has an empty 'Path' value"):
        read_path_table(tmp_path / "blank.csv")
    with pytest.raises(ValueError, match="has no 'Mask' column"):
        read_path_table(tmp_path / "gone.csv", required=("Path", "Mask"))
    (tmp_path / "dup.csv").write_text("Path\nvols/v0.nii.gz\nvols/v0.nii.gz\n")
    with pytest.warns(UserWarning, match="1 duplicated"):
        read_path_table(tmp_path / "dup.csv")


def test_augment_flips_image_and_mask_identically():
    rng = np.random.default_rng(0)
    img = rng.random((6, 7, 8), dtype=np.float32)
    mask = (img > 0.5).astype(np.int64)
    combos = [axes for n in range(4) for axes in itertools.combinations(range(3), n)]
    seen = set()
    for seed in range(16):
        a, m = Augment3D()(img, mask, np.random.default_rng(seed))
        assert np.array_equal(m, a > 0.5) and a.flags.c_contiguous and m.flags.c_contiguous
        seen.update(axes for axes in combos if np.array_equal(a, np.flip(img, axes) if axes else img))
    assert len(seen) >= 5
    j, _ = Augment3D(flip_prob=0.0, intensity_jitter=0.1)(img, None, np.random.default_rng(1))
    assert 0 <= j.min() and j.max() <= 1 and not np.allclose(j, img)


def test_crops_pad_small_volumes_and_oversample_foreground():
    a = np.arange(4 * 6 * 10, dtype=np.float32).reshape(4, 6, 10)
    c = center_crop_or_pad(a, (6, 4, 4), -1.0)
    assert c.shape == (6, 4, 4) and (c[0] == -1).all() and np.array_equal(c[1:5], a[:, 1:5, 3:7])
    fg = np.zeros((32, 32, 32), np.int64)
    fg[30, 1, 30] = 1
    img = np.zeros((32, 32, 32), np.float32)
    for s in range(10):
        ci, cm = random_crop([img, fg], (8, 8, 8), np.random.default_rng(s), fg_mask=fg, fg_prob=1.0)
        assert ci.shape == cm.shape == (8, 8, 8) and cm.sum() == 1
    hits = sum(random_crop([fg], (8, 8, 8), np.random.default_rng(s))[0].sum() for s in range(50))
    assert hits < 10


def test_pretraining_items_shapes_ranges_and_determinism(table):
    ds = Custom3DDataset(str(table), input_size=(8, 16, 16), preprocess=PreprocessConfig(size=(10, 20, 20)), seed=3)
    x, i = ds[1]
    assert x.shape == (1, 8, 16, 16) and x.dtype == torch.float32 and i == 1 and 0 <= x.min() and x.max() <= 1
    assert x.max() > 0.6 and len(ds) == 4 and ds.paths[1].endswith("v1.nii.gz")
    again = Custom3DDataset(str(table), input_size=(8, 16, 16), preprocess=PreprocessConfig(size=(10, 20, 20)), seed=3)
    assert all(torch.equal(ds[k][0], again[k][0]) for k in range(4))
    ds.set_epoch(1)
    assert any(not torch.equal(ds[k][0], again[k][0]) for k in range(4))
    ev = Custom3DDataset(str(table), input_size=16, train=False)
    assert ev[0][0].shape == (1, 16, 16, 16) and torch.equal(ev[0][0], ev[0][0])


def test_pretraining_skip_bad_replaces_unreadable_volumes(table, tmp_path):
    bad = build_bad_files(tmp_path / "bad")
    df = pd.read_csv(table)
    rows = [df["Path"][0], str(bad["truncated"]), str(bad["2d"]), df["Path"][1]]
    (tmp_path / "mixed.csv").write_text("Path\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="truncated.nii.gz: is truncated"):
        Custom3DDataset(str(tmp_path / "mixed.csv"), input_size=8)[1]
    ds = Custom3DDataset(str(tmp_path / "mixed.csv"), input_size=8, skip_bad=True)
    x, i = ds[1]
    assert i == 1 and x.shape == (1, 8, 8, 8) and ds.bad_files == [str(bad["truncated"]), str(bad["2d"])]


def test_finetune_labels_binary_multiclass_multilabel_regression(table):
    ds = fine.Custom3DDataset(str(table), input_size=8)
    x, y = ds[0]
    assert x.shape == (1, 8, 8, 8) and y.dtype == torch.int64 and y.shape == () and int(y) == 0
    assert ds.nb_classes == 3 and ds.class_counts == [2, 1, 1] and ds.label_names == ["0", "1", "2"]
    assert list(ds.targets) == [0, 1, 2, 0]
    assert fine.Custom3DDataset(str(table), input_size=8, nb_classes=5).nb_classes == 5
    ml = fine.Custom3DDataset(str(table), input_size=8, label_columns=["A", "B"])
    y = ml[1][1]
    assert ml.task_type.multi_label and y.dtype == torch.float32 and y.tolist() == [1.0, 0.0] and ml.label_names == ["A", "B"]
    assert ml.nb_classes == 2 and ml.class_counts == [2, 2]
    rg = fine.Custom3DDataset(str(table), input_size=8, label_columns=["Size"], regression=True)
    assert rg[3][1].dtype == torch.float32 and rg[3][1].shape == () and float(rg[3][1]) == 1.5


@pytest.mark.parametrize("cell,kind", [("x", "class"), ("", "class"), ("1.5", "class"), ("-1", "class"),
                                       ("2", "multilabel"), ("abc", "regression")])
def test_finetune_bad_labels_name_the_row_and_column(table, tmp_path, cell, kind):
    df = pd.read_csv(table)
    col = {"class": "Label", "multilabel": "A", "regression": "Size"}[kind]
    df[col] = df[col].astype(object)
    df.loc[2, col] = cell
    df.to_csv(tmp_path / "bad.csv", index=False)
    kw = {"class": {}, "multilabel": dict(label_columns=["A", "B"]),
          "regression": dict(label_columns=["Size"], regression=True)}[kind]
    with pytest.raises(ValueError, match=rf"bad\.csv: row 3 \(line 4\), column '{col}': expected"):
        fine.Custom3DDataset(str(tmp_path / "bad.csv"), input_size=8, **kw)


def test_segmentation_items_keep_mask_on_image_through_crops_and_flips(table):
    cfg = PreprocessConfig(size=(12, 20, 24), interpolator="nearest")
    ds = fine.Custom3DDataset(str(table), input_size=(8, 12, 12), preprocess=cfg, task="segmentation", fg_prob=1.0)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for k in range(len(ds)):
            x, m = ds[k]
            assert x.shape == (1, 8, 12, 12) and m.shape == (8, 12, 12) and m.dtype == torch.int64
            assert m.sum() > 0 and torch.equal(m > 0, x[0] > 0.5)
    ev = fine.Custom3DDataset(str(table), input_size=8, preprocess=cfg, task="segmentation", train=False,
                              whole_volume=True)
    x, m = ev[0]
    assert x.shape == (1, 12, 20, 24) and m.shape == (12, 20, 24) and torch.equal(m > 0, x[0] > 0.5)
    assert ev.nb_classes == 2 and ev.label_names == ["0", "1"]


def test_segmentation_mask_values_beyond_nb_classes_are_reported(table, tmp_path):
    df = pd.read_csv(table)
    img = sitk.ReadImage(str(table.parent / df["Mask"][0]))
    sitk.WriteImage(img * 3, str(tmp_path / "m3.nii.gz"))
    df.loc[0, "Mask"] = str(tmp_path / "m3.nii.gz")
    df.to_csv(tmp_path / "seg.csv", index=False)
    ds = fine.Custom3DDataset(str(tmp_path / "seg.csv"), input_size=8, task="segmentation")
    with pytest.raises(ValueError, match=r"m3\.nii\.gz: holds label values 0\.\.3; expected 0\.\.1"):
        ds[0]
    four = fine.Custom3DDataset(str(tmp_path / "seg.csv"), input_size=8, task="segmentation", nb_classes=4)
    assert four[0][1].max() == 3


def test_uint16_transport_gives_the_float32_items_exactly(table, tmp_path):
    from torch.utils.data import default_collate

    from util.data.transport import to_device

    kw = dict(input_size=(8, 12, 16), preprocess=PreprocessConfig(size=(10, 20, 20)), cache_dir=str(tmp_path / "c"),
              seed=3)
    for ds in (Custom3DDataset(str(table), **kw), fine.Custom3DDataset(str(table), task="segmentation", **kw)):
        flips = 0
        for epoch in range(4):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                ds.set_transport("float32")
                want_x, want_y = ds[i]
                ds.set_transport("uint16")
                item = ds[i]
                assert item[0].dtype == torch.int16 and item[0].numel() * 2 == want_x.numel() * 2
                x, y = to_device(default_collate([item]), "cpu", flip_target=ds.mask_paths is not None)
                assert torch.equal(x[0], want_x) and torch.equal(y[0], torch.as_tensor(want_y))
                flips += bool(item[2])
        assert 0 < flips < 16  # the innermost flip was deferred to the device for some items, not all


def test_intensity_jitter_reads_through_the_cache_in_both_transports(table, tmp_path):
    from torch.utils.data import default_collate

    from util.data.transport import to_device

    ds = Custom3DDataset(str(table), input_size=(8, 12, 16), preprocess=PreprocessConfig(size=(10, 20, 20)),
                         cache_dir=str(tmp_path / "c"), seed=3, intensity_jitter=0.2)
    plain = Custom3DDataset(str(table), input_size=(8, 12, 16), preprocess=PreprocessConfig(size=(10, 20, 20)),
                            cache_dir=str(tmp_path / "c"), seed=3)
    for i in range(len(ds)):
        ds[i], ds[i]  # first read fills the cache, the second comes from it as uint16
        ds.set_transport("float32")
        want = ds[i][0]
        ds.set_transport("uint16")
        x, _ = to_device(default_collate([ds[i]]), "cpu")
        assert want.dtype == torch.float32 and torch.equal(x[0], want)
        assert 0 <= want.min() and want.max() <= 1 and not torch.equal(want, plain[i][0])  # jittered
