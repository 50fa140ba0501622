"""Checkpoint I/O: atomic writes survive a full disk, hostile pickles never run, torn files are detected."""
from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import make_hostile_checkpoint
from util import checkpoint as ck
from util.plain import plain
from util.task.record import CheckpointRecord, find_resume


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    make_hostile_checkpoint(path, marker)
    assert not marker.exists()
    with pytest.raises(ck.UnsafeCheckpointError, match="evil.pth.*unsafe pickle"):
        ck.load_checkpoint(path)
    assert not marker.exists()


def test_atomic_save_on_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import util.atomic

    path = tmp_path / "checkpoint-last.pth"
    ck.save_atomic({"epoch": 1, "model": {"w": torch.ones(3)}}, path)
    tmp = tmp_path / ".tmp-full-checkpoint-last.pth"
    os.symlink("/dev/full", tmp)  # every write to the temporary file fails with ENOSPC, as on a full disk
    monkeypatch.setattr(util.atomic, "tmp_path_for", lambda p: str(tmp))
    with pytest.raises(OSError, match="checkpoint-last.pth.*No space left on device.*intact"):
        ck.save_atomic({"epoch": 2, "model": {"w": torch.zeros(10_000)}}, path)
    assert ck.load_checkpoint(path)["epoch"] == 1
    assert not os.path.lexists(tmp) and not list(tmp_path.glob(".tmp-*"))


def test_torn_and_foreign_files_are_reported_as_corrupt(tmp_path):
    good = tmp_path / "good.pth"
    ck.save_atomic({"epoch": 0, "model": {"w": torch.ones(1000)}}, good)
    torn = tmp_path / "torn.pth"
    torn.write_bytes(good.read_bytes()[:500])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    for p in (torn, text):
        with pytest.raises(ck.CorruptCheckpointError, match=p.name):
            ck.load_checkpoint(p)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ck.load_checkpoint(tmp_path / "missing.pth")


def test_find_resume_skips_a_torn_last_checkpoint(tmp_path, capsys):
    for e in (1, 3):
        ck.save_atomic({"epoch": e, "model": {"w": torch.ones(1)}, "optimizer": {}}, tmp_path / f"checkpoint-{e}.pth")
    (tmp_path / "checkpoint-last.pth").write_bytes(b"PK\x03\x04 torn")
    path, rec = find_resume(tmp_path)
    assert path.endswith("checkpoint-3.pth") and rec.epoch == 3
    assert "WARNING" in capsys.readouterr().out


def test_the_record_strips_ddp_and_compile_prefixes():
    sd = {"model": {"module.blocks.0.attn.qkv.weight": 1, "_orig_mod.cls_token": 2, "blocks.1._orig_mod.x": 3}}
    assert CheckpointRecord.from_dict(sd).weights == {"blocks.0.attn.qkv.weight": 1, "cls_token": 2, "blocks.1.x": 3}


def test_plain_makes_args_loadable_with_weights_only(tmp_path):
    import argparse
    from pathlib import Path

    ns = argparse.Namespace(input_size=(1, 2, 3), out=Path("/x"), lr=None, flag=True)
    ck.save_atomic({"args": plain(vars(ns))}, tmp_path / "a.pth")
    assert ck.load_checkpoint(tmp_path / "a.pth")["args"] == {"input_size": [1, 2, 3], "out": "/x", "lr": None,
                                                              "flag": True}
