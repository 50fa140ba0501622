"""Checkpoint I/O: atomic writes survive a full disk, hostile pickles never run, torn files are detected."""
from __future__ import annotations

import os

import pytest
import torch

from util import checkpoint as ck


class _Evil:
    """Unpickling this object would create a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make_hostile_checkpoint(path, marker) -> None:
    torch.save({"model": {"w": torch.zeros(2)}, "args": _Evil(str(marker))}, path, pickle_protocol=2)


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    make_hostile_checkpoint(path, marker)
    assert not marker.exists()
    with pytest.raises(ck.UnsafeCheckpointError, match="evil.pth.*unsafe pickle"):
        ck.load_checkpoint(path)
    assert not marker.exists()


def test_atomic_save_on_full_disk_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    ck.save_atomic({"epoch": 1, "model": {"w": torch.ones(3)}}, path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    os.symlink("/dev/full", tmp)  # every write to the temporary file fails with ENOSPC, as on a full disk
    with pytest.raises(OSError, match="checkpoint-last.pth.*No space left on device.*intact"):
        ck.save_atomic({"epoch": 2, "model": {"w": torch.zeros(10_000)}}, path)
    assert ck.load_checkpoint(path)["epoch"] == 1
    assert not os.path.lexists(tmp)


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
        ck.save_atomic({"epoch": e, "model": {}}, tmp_path / f"checkpoint-{e}.pth")
    (tmp_path / "checkpoint-last.pth").write_bytes(b"PK\x03\x04 torn")
    path, state = ck.find_resume(tmp_path)
    assert path.endswith("checkpoint-3.pth") and state["epoch"] == 3
    assert "WARNING" in capsys.readouterr().out


def test_clean_state_dict_strips_ddp_and_compile_prefixes():
    sd = {"model": {"module.blocks.0.attn.qkv.weight": 1, "_orig_mod.cls_token": 2, "blocks.1._orig_mod.x": 3}}
    assert ck.clean_state_dict(sd) == {"blocks.0.attn.qkv.weight": 1, "cls_token": 2, "blocks.1.x": 3}


def test_plain_makes_args_loadable_with_weights_only(tmp_path):
    import argparse
    from pathlib import Path

    ns = argparse.Namespace(input_size=(1, 2, 3), out=Path("/x"), lr=None, flag=True)
    ck.save_atomic({"args": ck.plain(vars(ns))}, tmp_path / "a.pth")
    assert ck.load_checkpoint(tmp_path / "a.pth")["args"] == {"input_size": [1, 2, 3], "out": "/x", "lr": None,
                                                              "flag": True}
