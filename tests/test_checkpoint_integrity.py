"""Checksummed checkpoints (issue 29): every checkpoint we write carries a CRC32 of the whole file that every load
verifies; a zip from elsewhere is checked record by record; a flipped byte is refused, never loaded, and resume falls
back to the newest intact file. Fault injection flips every byte of a checkpoint in turn."""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import struct
import threading
import zipfile

import pytest
import torch

from tests.helpers import run_in_process, save_tiny_mae, tiny_pretrain_args
from util import checkpoint as ck
from util.errors import UserError
from util.finite import first_non_finite
from util.task.record import find_resume


TRAILER = 20  # bytes of the zip archive comment 'mae3d-crc32:<8 hex digits>' that ends our files


def training_state(seed: int = 0, layers: int = 3) -> dict:
    """A small training state: weights, AdamW with both moments, plain args."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))[:layers]
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 12)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "args": {"lr": 1e-3, "size": [8]}}


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def flip(raw: bytes, at: int, n: int = 1, seed: int = 0) -> bytes:
    """`raw` with `n` bytes from `at` changed (each XORed with a random nonzero value): bit rot, same length."""
    rng, out = random.Random(seed), bytearray(raw)
    for i in range(at, min(at + n, len(out))):
        out[i] ^= rng.randrange(1, 256)
    return bytes(out)


@contextlib.contextmanager
def flipped_in_place(path, at: int, n: int = 1, seed: int = 0):
    """`path` with `n` bytes from `at` changed as by flip() until the block ends (rewriting a whole file per flip is
    slow: truncating costs milliseconds)."""
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, n, at)
        rng = random.Random(seed)
        os.pwrite(fd, bytes(b ^ rng.randrange(1, 256) for b in old), at)
        try:
            yield path
        finally:
            os.pwrite(fd, old, at)
    finally:
        os.close(fd)


def load_outcome(path, original) -> str:
    """'refused', 'same' (loaded, equal to the original) or 'WRONG' (loaded something else)."""
    try:
        got = ck.load_checkpoint(path)
    except ck.CorruptCheckpointError:
        return "refused"
    return "same" if equal(got, original) else "WRONG"


def largest_record(path) -> tuple[str, int, int]:
    """(name, first data byte, size) of the largest tensor storage in a zip."""
    info = max((i for i in zipfile.ZipFile(path).infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        nlen, elen = struct.unpack("<HH", f.read(4))
    return info.filename, info.header_offset + 30 + nlen + elen, info.file_size


def unread_fields(path) -> set[int]:
    """Offsets of the zip fields that no reader uses (versions, timestamps, attributes, the local copies of CRC and
    sizes that a data descriptor replaces, the alignment padding's bytes), found with zipfile's own parser. (One bit
    of the attributes is read: miniz reads nothing for an entry marked as a folder, leaving the tensor uninitialised;
    the check refuses it, which the exhaustive test below found.)"""
    raw, z = open(path, "rb").read(), zipfile.ZipFile(path)
    spans = []
    for info in z.infolist():
        o = info.header_offset
        nlen, elen = struct.unpack_from("<HH", raw, o + 26)
        spans += [(o + 4, 2), (o + 10, 4), (o + 14, 12), (o + 30 + nlen, 2), (o + 34 + nlen, elen - 4)]
    c = z.start_dir
    for _ in z.infolist():
        nlen, elen, clen = struct.unpack_from("<HHH", raw, c + 28)
        spans += [(c + 4, 4), (c + 12, 4), (c + 36, 6)]
        c += 46 + nlen + elen + clen
    spans.append((c + 12, 4))  # the zip64 end record (torch always writes one) follows the directory
    return {o + k for o, n in spans for k in range(n)}


def test_every_single_byte_flip_of_our_checkpoint_is_refused(tmp_path):
    """Every offset of the file in turn: data, headers, padding, directory, end records and the checksum itself."""
    state = training_state(layers=1)
    good = tmp_path / "checkpoint-last.pth"
    ck.save_atomic(state, good)
    raw = good.read_bytes()
    assert raw[-TRAILER:].startswith(b"mae3d-crc32:") and zipfile.ZipFile(good).testzip() is None
    assert equal(ck.load_checkpoint(good), state)
    outcomes = {}
    for at in range(len(raw)):
        with flipped_in_place(good, at, seed=at):
            outcomes[at] = load_outcome(good, state)
    assert set(outcomes.values()) == {"refused"}, {k: v for k, v in outcomes.items() if v != "refused"}
    for at in random.Random(1).sample(range(len(raw)), 50):  # bursts of 2 to 300 bytes
        with flipped_in_place(good, at, n=random.Random(at).randrange(2, 300), seed=at):
            assert load_outcome(good, state) == "refused", at
    assert equal(ck.load_checkpoint(good), state)


def test_flips_in_a_file_from_elsewhere_are_refused_unless_no_reader_uses_the_byte(tmp_path):
    """A torch.save'd file of the original project (no checksum of ours): every flip that changes a byte a reader
    uses is refused (record data by its CRC32, headers by their second copy); what loads is equal to the original and
    was a flip in a timestamp, a version, an attribute or the padding."""
    state = {**training_state(1, layers=1), "args": argparse.Namespace(model="mae_vit_tiny_patch16", input_size=8)}
    good = tmp_path / "checkpoint-399.pth"
    torch.save(state, good)
    expected = state  # its Namespace as it was saved (the checkpoint record turns it into a dict)
    assert equal(ck.load_checkpoint(good), expected)
    outcomes = {}
    for at in range(good.stat().st_size):
        with flipped_in_place(good, at, seed=at):
            outcomes[at] = load_outcome(good, expected)
    assert "WRONG" not in outcomes.values(), [at for at, v in outcomes.items() if v == "WRONG"]
    loaded, unread = [at for at, v in outcomes.items() if v == "same"], unread_fields(good)
    assert loaded and set(loaded) <= unread, sorted(set(loaded) - unread)


def test_the_two_files_of_the_report_are_refused_naming_the_record(tmp_path):
    """256 flipped bytes inside a tensor of an --init file; 64 inside one of checkpoint-last.pth (before: both
    loaded, one with weights of 755 instead of 0.086)."""
    init = save_tiny_mae(tmp_path / "tangerine.pth")
    name, start, size = largest_record(init)
    rot = tmp_path / "rot.pth"
    rot.write_bytes(flip(init.read_bytes(), start + size // 2, n=256))
    with pytest.raises(ck.CorruptCheckpointError, match=rf"Checkpoint {rot} is damaged: record '{name}' \(byte \d+\) "
                                                     rf"fails its CRC32 check \(stored \w+, computed \w+\)"):
        ck.load_checkpoint(rot)
    last = tmp_path / "checkpoint-last.pth"
    ck.save_atomic(training_state(), last)
    name, start, size = largest_record(last)
    last.write_bytes(flip(last.read_bytes(), start + 8, n=64))
    with pytest.raises(ck.CorruptCheckpointError, match=rf"record '{name}' \(byte \d+\) fails its CRC32 check"):
        ck.load_checkpoint(last)


@pytest.fixture(scope="module")
def demo_csv(tmp_path_factory):
    from util.data.demo import make_demo_data

    root = tmp_path_factory.mktemp("integrity")
    return make_demo_data(str(root / "demo"), n_pretrain=4, n_labeled=4, seed=3)["pretrain"]


def test_a_flipped_init_file_stops_pretraining_with_one_sentence(demo_csv, tmp_path):
    init = save_tiny_mae(tmp_path / "a.pth", size=32)
    name, start, size = largest_record(init)
    init.write_bytes(flip(init.read_bytes(), start + size // 3, n=256))
    r = run_in_process("main_pretrain.py", *tiny_pretrain_args(demo_csv, tmp_path / "out", epochs=1, init=init))
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-2000:]
    assert f"{init} is damaged: record '{name}'" in errors[0] and "fails its CRC32 check" in errors[0]
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


def test_a_flipped_last_checkpoint_resumes_from_the_newest_intact_one(demo_csv, tmp_path):
    out = tmp_path / "run"
    r = run_in_process("main_pretrain.py", *tiny_pretrain_args(demo_csv, out, epochs=2, save_every=1))
    assert r.returncode == 0, r.stderr[-2000:]
    last = out / "checkpoint-last.pth"
    name, start, size = largest_record(last)
    last.write_bytes(flip(last.read_bytes(), start + size // 2, n=64))
    r = run_in_process("main_pretrain.py", *tiny_pretrain_args(demo_csv, out, epochs=3, save_every=1))
    assert r.returncode == 0, r.stderr[-2000:]
    warning = [x for x in r.stdout.splitlines() if x.startswith("WARNING: Checkpoint")]
    assert len(warning) == 2, r.stdout[-2000:]  # checkpoint-2.pth is a hard link to the same damaged file
    assert f"{last} is damaged: record '{name}'" in warning[0] and "checkpoint-2.pth is damaged" in warning[1]
    assert "fails its CRC32 check" in warning[0] and "Trying an older checkpoint" in warning[0]
    assert f"Resumed from {out / 'checkpoint-1.pth'}" in r.stdout
    assert ck.load_checkpoint(last)["epoch"] == 2  # rewritten whole by the resumed run


def test_resume_refuses_to_start_over_when_no_checkpoint_is_intact(tmp_path, capsys):
    ck.save_atomic(training_state(), tmp_path / "checkpoint-last.pth")
    ck.save_atomic(training_state(), tmp_path / "checkpoint-2.pth")
    for p in tmp_path.glob("checkpoint-*.pth"):
        p.write_bytes(flip(p.read_bytes(), 100, n=4))
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError, match=r"No intact checkpoint to resume in .*checkpoint-last.pth, checkpoint-2.pth "
                                        r"refused .*--resume none"):
        find_resume(tmp_path)
    assert capsys.readouterr().out.count("is damaged") == 2
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_checkpoints_from_before_the_checksum_and_rezipped_ones_are_checked_record_by_record(tmp_path):
    """Our files written before the checksum (torch.save into an open file), and the same archive rewritten by
    Python's zipfile (deflated; stored with zip64 headers): they load, and a flip in a record is refused."""
    state = training_state(2)
    old = tmp_path / "old.pth"
    with open(old, "wb") as f:
        torch.save(state, f)
    src = zipfile.ZipFile(old)
    files = [old]
    for compression, zip64 in ((zipfile.ZIP_DEFLATED, False), (zipfile.ZIP_STORED, True)):
        files.append(tmp_path / f"rezipped_{compression}.pth")
        with zipfile.ZipFile(files[-1], "w", compression=compression) as out:
            for info in src.infolist():
                with out.open(info.filename, "w", force_zip64=zip64) as w:
                    w.write(src.read(info.filename))
    for path in files:
        assert equal(ck.load_checkpoint(path), state)
        name, start, size = largest_record(path)
        bad = tmp_path / "bad.pth"
        bad.write_bytes(flip(path.read_bytes(), start + 3, n=2))
        with pytest.raises(ck.CorruptCheckpointError, match=rf"record '{name}'"):
            ck.load_checkpoint(bad)


def test_formats_without_checksums_load_with_one_line_saying_so(tmp_path, capsys):
    from torch.utils.serialization import config

    legacy, no_crcs = tmp_path / "legacy.pth", tmp_path / "no_crcs.pth"
    torch.save(training_state(), legacy, _use_new_zipfile_serialization=False)
    config.save.compute_crc32 = False
    try:
        torch.save(training_state(), no_crcs)
    finally:
        config.save.compute_crc32 = True
    assert equal(ck.load_checkpoint(legacy), training_state()) and equal(ck.load_checkpoint(no_crcs), training_state())
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"WARNING: Checkpoint {legacy} is in torch's legacy (non-zip) format, which carries no checksum: "
                     f"damage inside it cannot be detected.",
                     f"WARNING: Checkpoint {no_crcs} was saved without CRC32s (torch.serialization.config.save."
                     f"compute_crc32=False): its zip structure was checked, its data cannot be."]
    ck.save_atomic(training_state(), tmp_path / "ours.pth")
    assert equal(ck.load_checkpoint(tmp_path / "ours.pth"), training_state())
    assert capsys.readouterr().out == ""  # ours: silent


def test_the_checksum_is_computed_in_the_writer_thread(tmp_path, monkeypatch):
    from util.checkpoint_verify import ChecksummedFile

    threads = set()
    write = ChecksummedFile.write
    monkeypatch.setattr(ChecksummedFile, "write", lambda self, data: threads.add(threading.current_thread().name)
                        or write(self, data))
    writer = ck.CheckpointWriter()
    writer.save(training_state(), [tmp_path / "checkpoint-last.pth", tmp_path / "checkpoint-1.pth"])
    writer.wait()
    assert threads == {"checkpoint-writer"}
    for name in ("checkpoint-last.pth", "checkpoint-1.pth"):
        assert re.fullmatch(rb"mae3d-crc32:[0-9a-f]{8}", (tmp_path / name).read_bytes()[-TRAILER:])
        assert equal(ck.load_checkpoint(tmp_path / name), training_state())


def test_a_file_replaced_while_it_loads_is_verified_again(tmp_path, monkeypatch):
    """A run rewrites checkpoint-last.pth (atomic rename) between the check and torch.load: the bytes loaded are
    those checked, or the load starts over on the new file, which here is damaged and refused."""
    path, newer = tmp_path / "checkpoint-last.pth", tmp_path / ".tmp-newer"
    ck.save_atomic(training_state(0), path)
    ck.save_atomic(training_state(1), newer)
    name, start, _ = largest_record(newer)
    newer.write_bytes(flip(newer.read_bytes(), start, n=8))
    torch_load = ck._torch_load

    def replaced_first(p, map_location):
        if newer.exists():
            os.replace(newer, path)
        return torch_load(p, map_location)

    monkeypatch.setattr(ck, "_torch_load", replaced_first)
    with pytest.raises(ck.CorruptCheckpointError, match=rf"{path} is damaged: record '{name}'"):
        ck.load_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
                                   torch.complex64])
def test_the_nan_scan_finds_nan_and_both_infinities_in_every_float_type(dtype):
    """The scan reads each tensor once with aminmax (isfinite().all() took 12 s on a ViT-L checkpoint)."""
    assert first_non_finite({"w": torch.zeros(3, 5, dtype=dtype), "e": torch.zeros(0, dtype=dtype)}) is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        if dtype == torch.float8_e4m3fn and bad == bad:
            continue  # e4m3fn has NaN but no infinity (an infinity becomes +-448)
        w = torch.zeros(3, 5, dtype=torch.float32)
        w[2, 3] = bad
        state = {"model": {"ok": torch.ones(2), "w": w.to(dtype)}, "epoch": 1}
        assert first_non_finite(state) == "model.w", (dtype, bad)


def test_the_checkpoint_benchmark_runs(tmp_path, capsys):
    from bench.bench_checkpoint import main

    r = main(["--quick", "--model", "mae_vit_tiny_patch16", "--repeats", "1", "--hashes", "--out_dir", str(tmp_path)])
    assert {"write_plain_s", "write_checksum_s", "verify_ours_s", "verify_records_s", "scan_now_s"} <= r.keys()
    assert {"zlib.crc32", "sha256", "blake2b"} <= r["hash_gb_s"].keys() and not list(tmp_path.iterdir())
    assert "verify ours (whole-file CRC32)" in capsys.readouterr().out
