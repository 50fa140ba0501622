"""Cache entries (format 2): every damaged byte is detected and the entry rebuilt, never fed; the earlier .npy
format is refused with how to rebuild; the folder's settings; real CTs within half a HU of today's values and under
0.45x today's bytes."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from datasets_three_d import Custom3DDataset
from helpers import run_in_process
from util.volume.cache import HU_ZERO, QMAX, CacheFormatError, CacheSettings, VolumeCache, decode, encode
from util.volume.preprocess import PreprocessConfig, cache_keys, load_cached, load_volume

CFG = PreprocessConfig(size=(12, 16, 20))


def write_ct(path: Path, seed: int = 0, shape=(10, 14, 16)) -> Path:
    """A small int16 'CT': smooth anatomy plus noise, in HU."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    hu = -1000 + 1050 * (x ** 2 + y ** 2 + 0.5 * z ** 2 < 0.6) + rng.normal(0, 20, shape)
    img = sitk.GetImageFromArray(hu.astype(np.int16))
    img.SetSpacing((1.0, 1.2, 2.5))
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture()
def case(tmp_path) -> dict:
    img = write_ct(tmp_path / "ct.nii.gz")
    mask = sitk.GetImageFromArray((sitk.GetArrayFromImage(sitk.ReadImage(str(img))) > -500).astype(np.uint8))
    mask.CopyInformation(sitk.ReadImage(str(img)))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    cache = VolumeCache(tmp_path / "cache")
    clean = load_cached(str(img), CFG, cache, str(tmp_path / "mask.nii.gz"), decoded=False)
    paths = [cache.path(k) for k in cache_keys(str(img), CFG, str(tmp_path / "mask.nii.gz"))]
    return {"img": str(img), "mask": str(tmp_path / "mask.nii.gz"), "cache": cache, "clean": clean, "paths": paths,
            "bytes": [Path(p).read_bytes() for p in paths]}


def damaged_versions(data: bytes, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """(where, damaged bytes): every byte of magic + length + header, 80 random payload bytes, every CRC byte (each
    XORed with a random non-zero value), 12 random multi-byte bursts, and cuts."""
    header_end = 12 + int.from_bytes(data[8:12], "little")
    offsets = [("header", i) for i in range(header_end)]
    offsets += [("payload", int(i)) for i in rng.integers(header_end, len(data) - 4, 80)]
    offsets += [("crc", i) for i in range(len(data) - 4, len(data))]
    out = []
    for where, i in offsets:
        b = bytearray(data)
        b[i] ^= int(rng.integers(1, 256))
        out.append((f"{where} byte {i}", bytes(b)))
    for _ in range(12):
        i, n = int(rng.integers(0, len(data) - 8)), int(rng.integers(2, 8))
        b = bytearray(data)
        b[i:i + n] = bytes((x ^ int(rng.integers(1, 256))) for x in b[i:i + n])
        out.append((f"burst at {i}", bytes(b)))
    out += [("cut in the payload", data[:len(data) // 2]), ("cut before the CRC", data[:-3]), ("empty", b"")]
    return out


def test_every_flipped_byte_of_an_entry_is_detected_and_the_entry_rebuilt_never_fed(case):
    """Issue 29's fault injection for the cache: flips at many offsets of an image and a label-map entry."""
    cache, rng = case["cache"], np.random.default_rng(29)
    n = 0
    for k, (path, good) in enumerate(zip(case["paths"], case["bytes"])):
        for where, bad in damaged_versions(good, rng):
            Path(path).write_bytes(bad)
            damaged = cache.damaged
            img, mask = load_cached(case["img"], CFG, cache, case["mask"], decoded=False)
            assert cache.damaged == damaged + 1, f"entry {k}, {where}: not detected"
            assert np.array_equal(img, case["clean"][0]) and np.array_equal(mask, case["clean"][1]), where
            assert Path(path).read_bytes() == good, f"entry {k}, {where}: not rebuilt to the same bytes"
            n += 1
    assert n > 2 * 150


def test_a_damaged_entry_is_removed_said_and_training_gets_the_clean_volume(case, caplog, tmp_path):
    (tmp_path / "t.csv").write_text(f"Path\n{case['img']}\n")
    ds = Custom3DDataset(str(tmp_path / "t.csv"), input_size=(12, 16, 20), preprocess=CFG, train=False,
                         cache_dir=str(tmp_path / "cache"))
    want = ds[0][0]
    data = bytearray(case["bytes"][0])
    data[len(data) // 2] ^= 0x40
    Path(case["paths"][0]).write_bytes(bytes(data))
    assert ds.cache.get(cache_keys(case["img"], CFG)[0]) is None and not Path(case["paths"][0]).exists()
    Path(case["paths"][0]).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        got = ds[0][0]
    assert torch.equal(got, want)
    assert f"{case['paths'][0]}: damaged cache entry (checksum mismatch)" in caplog.text and case["img"] in caplog.text
    assert Path(case["paths"][0]).read_bytes() == case["bytes"][0]


def test_entries_round_trip_every_stored_kind(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("x")
    rng = np.random.default_rng(0)
    for step in (1.0, 0.5):
        cache = VolumeCache(tmp_path / str(step), CacheSettings(step_hu=step))
        arrays = [encode(rng.random((7, 9, 11), dtype=np.float32), 2000), rng.integers(0, 3, (7, 9, 11)),
                  rng.integers(-5, 300, (4, 5)), rng.normal(size=(3, 4)).astype(np.float32), np.zeros((0, 3), np.int64),
                  encode(rng.random((1, 5, 5), dtype=np.float32), 17)]
        for i, a in enumerate(arrays):
            levels = (2000, 0, 0, 0, 0, 17)[i]
            key, want = (str(src), "cfg", str(i)), a if a.dtype == np.uint16 else encode(a)
            cache.put_stored(key, want, levels)
            got = cache.get(key)
            assert np.array_equal(got, want) and got.dtype == want.dtype and got.shape == want.shape


def test_an_earlier_npy_cache_is_refused_with_how_to_rebuild_it(tmp_path):
    old = tmp_path / "old"
    (old / "ab").mkdir(parents=True)
    np.save(old / "ab" / "abcdef.npy", np.zeros((4, 4, 4), np.uint16))
    with pytest.raises(CacheFormatError, match=r"earlier uncompressed format .*main_cache\.py"):
        VolumeCache(old)
    img = write_ct(tmp_path / "ct.nii.gz")
    (tmp_path / "t.csv").write_text(f"Path\n{img}\n")
    with pytest.raises(CacheFormatError, match="delete that folder"):
        Custom3DDataset(str(tmp_path / "t.csv"), input_size=8, cache_dir=str(old))
    r = run_in_process("main_cache.py", "--csv", tmp_path / "t.csv", "--cache_dir", old, "--input_size", 8)
    lines = [s for s in r.stderr.splitlines() if s.strip() and not s.startswith("ResourceWarning")]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: --cache_dir {old}: ") and \
        "fill it again with main_cache.py" in lines[0], r.stderr


def test_the_folder_records_its_settings_and_refuses_others(tmp_path):
    img = write_ct(tmp_path / "ct.nii.gz")
    (tmp_path / "t.csv").write_text(f"Path\n{img}\n")
    cache = tmp_path / "c"
    r = run_in_process("main_cache.py", "--csv", tmp_path / "t.csv", "--cache_dir", cache, "--input_size", 8,
                       "--cache_step", 2)
    assert r.returncode == 0, r.stderr
    store = VolumeCache(cache)  # a reader (training) follows the folder
    assert store.settings == CacheSettings("zstd", 2.0) and store.settings.hu_range() == (-65536, 65534)
    stored = store.get(cache_keys(str(img), PreprocessConfig(size=(8, 8, 8)))[0])
    hu = (stored.astype(np.float64) - HU_ZERO) * 2  # levels of 2 HU
    assert stored is not None and stored.dtype == np.uint16 and -1200 < hu.min() < hu.max() < 1000
    r = run_in_process("main_cache.py", "--csv", tmp_path / "t.csv", "--cache_dir", cache, "--input_size", 8,
                       "--cache_step", 1)
    assert r.returncode == 2 and "was filled with --cache_step 2 (codec zstd" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def real_cts(shared_data) -> dict:
    ts = shared_data / "totalseg"
    return {"IRCAD": shared_data / "ircadb01" / "ct.nii.gz", "TotalSegmentator": ts / "example_ct.nii.gz",
            "TotalSegmentator small": ts / "example_ct_sm.nii.gz", "DICOM series": ts / "example_ct_dicom"}


@pytest.mark.parametrize("name", ["IRCAD", "TotalSegmentator", "TotalSegmentator small", "DICOM series"])
def test_real_cts_are_within_half_a_hu_of_todays_values_in_under_045x_the_bytes(real_cts, tmp_path, name):
    cfg = PreprocessConfig(size=(256,) * 3)
    x = load_volume(str(real_cts[name]), cfg)
    today = decode(encode(x))  # the uint16 .npy entry: 65535 levels of the window
    cache = VolumeCache(tmp_path / "c")
    now, _ = load_cached(str(real_cts[name]), cfg, cache)  # a miss gives what later hits give
    assert np.array_equal(now, load_cached(str(real_cts[name]), cfg, cache)[0]) and cache.hits == 1
    width = cfg.window[1] - cfg.window[0]
    hu_error = float(np.abs(now.astype(np.float64) - today).max()) * width
    assert hu_error <= 0.5 + 0.5 * width / QMAX + 1e-2, hu_error  # the 1-HU step, plus today's own rounding
    other = PreprocessConfig(size=(256,) * 3, window=(-160.0, 240.0))  # another window: the same entry, no new read
    narrow = load_cached(str(real_cts[name]), other, cache)[0]
    assert cache.hits == 2 and len(list((tmp_path / "c").rglob("*.vol"))) == 1
    hu = x.astype(np.float64) * width + cfg.window[0]  # today's preprocessing in HU (inside its window)
    inside = (hu > -1190) & (hu < 790)
    assert np.abs(narrow - np.clip((hu - other.window[0]) / 400, 0, 1))[inside].max() * 400 <= 0.5 + 1e-2
    key = cache_keys(str(real_cts[name]), cfg)[0]
    ratio = Path(cache.path(key)).stat().st_size / (x.size * 2 + 128)  # today: uint16 .npy with its 128-byte header
    assert ratio <= 0.45, ratio
