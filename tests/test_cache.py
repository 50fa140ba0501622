"""VolumeCache: precision, hits, invalidation, atomic concurrent writes; the loader benchmark smoke run.
The entry format, its checksum and the folder settings: tests/test_cache_entries.py."""
from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import datasets_three_d_fine as fine
import util.volume.preprocess
from datasets_three_d import Custom3DDataset
from util.volume.preprocess import PreprocessConfig
from util.errors import UserError
from util.volume.cache import QMAX, SUFFIX, CacheSettings, VolumeCache, decode, encode

ROOT = Path(__file__).resolve().parents[1]


def write_case(folder: Path, i: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(i)
    hu = rng.integers(-1100, 900, (10, 14, 16)).astype(np.int16)
    mask = (hu > 300).astype(np.uint8)
    paths = folder / f"c{i}.nii.gz", folder / f"c{i}_mask.nii.gz"
    for arr, p in zip((hu, mask), paths):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.0, 1.2, 2.5))
        sitk.WriteImage(img, str(p))
    return paths


@pytest.fixture()
def csv(tmp_path) -> Path:
    rows = []
    for i in range(3):
        img, mask = write_case(tmp_path, i)
        rows.append(f"{img.name},{i % 2},{mask.name}")
    (tmp_path / "t.csv").write_text("Path,Label,Mask\n" + "\n".join(rows) + "\n")
    return tmp_path / "t.csv"


@pytest.fixture()
def reads(monkeypatch) -> list[str]:
    """Every path the preprocessing (util.volume.preprocess.read_image) opens."""
    seen, real = [], util.volume.preprocess.read_image

    def counting(path):
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(util.volume.preprocess, "read_image", counting)
    return seen


def test_quantisation_error_is_half_a_level():
    x = np.random.default_rng(0).random((64, 64, 64), dtype=np.float32)
    x[0, 0, :3] = [0.0, 1.0, 0.5]
    for levels in (2000, 1000, 1):
        stored = encode(x, levels)
        assert stored.dtype == np.uint16 and stored.max() == levels
        assert np.abs(decode(stored, (0.0, 1.0 / levels)) - x).max() <= 0.5 / levels + 1e-7


def test_one_entry_in_hu_serves_every_window():
    hu = np.random.default_rng(1).uniform(-3000, 3000, (16, 16, 16)).astype(np.float32)
    settings = CacheSettings()  # 1 HU a level
    lo, hi = settings.hu_range()
    stored = encode((hu - lo) / (hi - lo), QMAX)
    for window in ((-1200, 800), (-1000, 400), (-160, 240), (-2000, 2000)):
        want = np.clip((hu - window[0]) / (window[1] - window[0]), 0, 1)
        got = decode(stored, settings.window_map(window))
        assert np.abs(got - want).max() * (window[1] - window[0]) <= 0.5 + 1e-2  # half a HU
    with pytest.raises(UserError, match="--cache_step"):
        CacheSettings(step_hu=0.1).window_map((-4000, 800))  # 0.1 HU a level holds +-3277 HU only


def test_uint16_quantisation_error_is_below_8e_6():
    x = np.random.default_rng(0).random((64, 64, 64), dtype=np.float32)
    x[0, 0, :3] = [0.0, 1.0, 0.5]
    stored = encode(x)
    err = np.abs(decode(stored) - x).max()
    assert stored.dtype == np.uint16 and err <= 0.5 / QMAX + 1e-7  # 7.6e-6 = 0.015 HU in a 2000 HU window
    assert decode(stored).dtype == np.float32 and decode(stored)[0, 0, 0] == 0 and decode(stored)[0, 0, 1] == 1
    assert encode(np.array([0, 3, 255])).dtype == np.uint8 and encode(np.array([0, 300])).dtype == np.int16
    assert encode(np.array([-2.0, 3.5])).dtype == np.float32


def test_put_get_round_trip_leaves_no_temporary_files(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("x")
    cache = VolumeCache(tmp_path / "cache")
    mask = np.random.default_rng(1).integers(0, 5, (6, 7, 8))
    assert cache.get((str(src), "cfg", "mask")) is None and cache.misses == 1
    where = cache.put((str(src), "cfg", "mask"), mask)
    got = cache.get((str(src), "cfg", "mask"))
    assert got.dtype == np.uint8 and np.array_equal(got, mask) and cache.hits == 1
    assert [p.name for p in Path(where).parent.iterdir()] == [Path(where).name] and where.endswith(SUFFIX)
    Path(where).write_bytes(b"garbage")  # a broken entry is a miss, and is removed
    assert cache.get((str(src), "cfg", "mask")) is None and not Path(where).exists()


def test_second_load_reads_from_the_cache_not_the_file(csv, tmp_path, reads):
    cfg = PreprocessConfig(size=(8, 8, 8))
    ds = Custom3DDataset(str(csv), input_size=8, preprocess=cfg, cache_dir=str(tmp_path / "cache"), train=False)
    first = ds[0][0]
    assert len(reads) == 1
    again = Custom3DDataset(str(csv), input_size=8, preprocess=cfg, cache_dir=str(tmp_path / "cache"), train=False)
    cached = again[0][0]
    assert len(reads) == 1 and torch.equal(cached, first)  # a miss gives the numbers a later hit gives
    nocache = Custom3DDataset(str(csv), input_size=8, preprocess=cfg, train=False)
    width = cfg.window[1] - cfg.window[0]  # 1 HU a level: half a HU at most
    assert np.abs(nocache[0][0] - cached).max() * width <= 0.5 + 1e-2 and len(reads) == 2  # + float32 rounding


def test_touching_the_file_or_changing_the_config_invalidates_but_another_window_does_not(csv, tmp_path, reads):
    kw = dict(input_size=8, cache_dir=str(tmp_path / "cache"), train=False)
    Custom3DDataset(str(csv), preprocess=PreprocessConfig(size=(8, 8, 8)), **kw)[1]
    Custom3DDataset(str(csv), preprocess=PreprocessConfig(size=(8, 8, 8)), **kw)[1]
    assert len(reads) == 1
    Custom3DDataset(str(csv), preprocess=PreprocessConfig(size=(8, 8, 8), window=(-1000, 400)), **kw)[1]
    assert len(reads) == 1  # the entry holds HU: every window reads it
    Custom3DDataset(str(csv), preprocess=PreprocessConfig(size=(8, 8, 8), interpolator="linear"), **kw)[1]
    assert len(reads) == 2
    path = csv.parent / "c1.nii.gz"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    Custom3DDataset(str(csv), preprocess=PreprocessConfig(size=(8, 8, 8)), **kw)[1]
    assert len(reads) == 3


def test_segmentation_caches_image_and_mask_and_rebuilds_when_the_image_changes(csv, tmp_path, reads):
    kw = dict(input_size=8, preprocess=PreprocessConfig(size=(8, 8, 8)), task="segmentation",
              cache_dir=str(tmp_path / "cache"), train=False)
    x, m = fine.Custom3DDataset(str(csv), **kw)[2]
    assert len(reads) == 2 and m.dtype.is_floating_point is False
    x2, m2 = fine.Custom3DDataset(str(csv), **kw)[2]
    assert len(reads) == 2 and (m2 == m).all() and (x2 - x).abs().max() <= 1e-5
    img = csv.parent / "c2.nii.gz"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # the mask entry depends on its image too
    fine.Custom3DDataset(str(csv), **kw)[2]
    assert len(reads) == 4


def _writer(args) -> bool:
    cache_dir, src, k = args
    cache = VolumeCache(cache_dir)
    for _ in range(20):
        cache.put((src, "cfg"), np.full((32, 32, 32), k / 10, np.float32))
        got = cache.get((src, "cfg"))
        assert got is not None and got.shape == (32, 32, 32) and np.ptp(got) == 0  # one writer's whole entry
    return True


def test_many_processes_fill_one_entry_without_torn_files(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("x")
    with mp.get_context("fork").Pool(4) as pool:
        assert all(pool.map(_writer, [(str(tmp_path / "c"), str(src), k) for k in range(4)]))
    files = [p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.name != "cache_format.json"]
    assert len(files) == 1 and files[0].suffix == SUFFIX


def test_bench_loader_quick_compares_the_resamplers_and_the_cache_formats(capsys):
    spec = importlib.util.spec_from_file_location("bench_loader", ROOT / "bench" / "bench_loader.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "first pass, one thread: SimpleITK" in out and "worker cores" in out
    fp, cached = result["first_pass"], result["cached"]
    assert all(t > 0 for t in fp["sitk_s"] + fp["separable_s"]) and fp["ratio"] > 0
    assert set(cached) == {"zstd"} and cached["zstd"]["ratio_per_core"] == 1.0
    for c in cached.values():
        assert len(c["vol_s"]) == 2 and all(v > 0 for v in c["vol_s"] + c["vol_s_per_core"])
        per_core = np.median(c["vol_s_per_core"] or c["vol_s"])
        assert c["workers_needed"] == pytest.approx(110 / per_core) and list(c["entry_bytes"].values())[0] > 0


def test_slice_differences_undone_on_the_device_give_the_float32_items_exactly(csv, tmp_path):
    """A crop that keeps every slice travels as stored (slice differences, bit 3) and the device undoes them, flips
    and windows: the numbers of the float32 items, also for a segmentation mask and a second window."""
    from torch.utils.data import default_collate

    from util.data.transport import to_device

    for window in ((-1200.0, 800.0), (-160.0, 240.0)):
        kw = dict(input_size=(10, 12, 16), preprocess=PreprocessConfig(size=(10, 20, 20), window=window),
                  cache_dir=str(tmp_path / "c"), seed=5)
        for ds in (Custom3DDataset(str(csv), **kw), fine.Custom3DDataset(str(csv), task="segmentation", **kw)):
            for i in range(len(ds)):
                ds[i]  # fills the cache: later reads are hits
            undone = 0
            for epoch in range(3):
                ds.set_epoch(epoch)
                for i in range(len(ds)):
                    ds.set_transport("float32")
                    want_x, want_y = ds[i]
                    ds.set_transport("uint16")
                    item = ds[i]
                    undone += int(item[2]) >> 3
                    x, y = to_device(default_collate([item]), "cpu", flip_target=ds.mask_paths is not None)
                    assert torch.equal(x[0], want_x) and torch.equal(y[0], torch.as_tensor(want_y))
            assert undone == 3 * len(ds)  # every item left its slice differences to the device
