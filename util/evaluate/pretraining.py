"""The pretraining data behind an encoder, for main_evaluate.py --pretraining: the data manifest a checkpoint or a
model folder records (read through its CheckpointRecord), a manifest file, or a list of paths."""
from __future__ import annotations

import os

import pandas as pd

from util.data.manifest import pretraining_data, recorded_manifest

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")


def pretraining_scans(source: str) -> tuple[pd.DataFrame, str]:
    """The scans behind `source` and a few words on what it is."""
    if os.path.isdir(source) or (source.endswith(CHECKPOINT_SUFFIXES) and os.path.isfile(source)):
        from util.task.record import read_record  # torch is imported only here

        ref = read_record(source, f"--pretraining {source}").data_manifest
        return recorded_manifest(source, ref.name if ref else None, ref.sha256 if ref else None)
    return pretraining_data(source)
