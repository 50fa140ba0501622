"""The files a run writes into its --output_dir, named in one place: every script, resume and test asks here.

    last        checkpoint-last.pth      rewritten every epoch (and inside epochs with --save_every_minutes/steps)
    best        checkpoint-best.pth      finetuning: the best validation epoch
    numbered(N) checkpoint-N.pth         pretraining: every --save_every epochs, and the final epoch (a hard link)
    pretrained  mae_pretrained.pth       pretraining: the final weights and preprocessing
    log         log.txt                  one JSON line per epoch
    args        args.json                the run's flags
    manifest    data_manifest.csv.gz     pretraining: the scans it trained on (util.data.manifest)
    status      exit_status.json         how the run ended (util.exit_status)
    picture(N)  reconstruction-000N.png  pretraining: the reconstruction of epoch N
    test_metrics / eval_metrics          finetuning: --test_csv / --eval scores
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

LAST, BEST, PRETRAINED = "checkpoint-last.pth", "checkpoint-best.pth", "mae_pretrained.pth"
LOG, ARGS, MANIFEST, STATUS = "log.txt", "args.json", "data_manifest.csv.gz", "exit_status.json"
TEST_METRICS, EVAL_METRICS = "test_metrics.json", "eval_metrics.json"
_NUMBERED = re.compile(r"checkpoint-(\d+)\.pth$")


def status_beside(output: str) -> str:
    """The status file of a run that writes into folders other runs may own (main_predict.py): beside its output,
    `<output>.exit_status.json`, never another run's exit_status.json."""
    return f"{os.path.abspath(output)}.{STATUS}"


def seg_output_name(stem: str, row: int | None = None) -> str:
    """main_predict.py's label map of a scan: `<stem>_seg.nii.gz`, or `<stem>_row<row>_seg.nii.gz` (rows from 1)
    when several rows share the stem."""
    return f"{stem}_seg.nii.gz" if row is None else f"{stem}_row{row}_seg.nii.gz"


@dataclass(frozen=True)
class DemoFolder:
    """The files of the demo data (util.data.demo), relative to its folder: tables and phantoms."""
    path: str

    def table(self, split: str) -> str:
        return os.path.join(self.path, f"{split}.csv")

    @staticmethod
    def pretrain_image(i: int) -> str:
        return f"images/pretrain_{i:03d}.nii.gz"

    @staticmethod
    def case_image(i: int) -> str:
        return f"images/case_{i:03d}.nii.gz"

    @staticmethod
    def case_mask(i: int) -> str:
        return f"masks/case_{i:03d}_effusion.nii.gz"


def nifti_name(stem: str) -> str:
    """`<stem>.nii.gz`: how the model card's example names one channel's scan."""
    return f"{stem}.nii.gz"


def scratch_array(folder: str, k: int) -> str:
    """A temporary .npy copy of the k-th feature set that main_evaluate.py's worker processes read memory-mapped."""
    return os.path.join(folder, f"features_{k}.npy")


def scratch_lists(folder: str, k: int) -> str:
    """A temporary .npz of one fold and draw's k-NN neighbour lists, for the worker process that votes with them."""
    return os.path.join(folder, f"knn_lists_{k}.npz")


def numbered(epoch: int) -> str:
    return f"checkpoint-{epoch}.pth"


def epoch_of(path: str) -> int:
    """N of a checkpoint-N.pth path; -1 for any other name."""
    m = _NUMBERED.search(os.path.basename(path))
    return int(m.group(1)) if m else -1


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder's files (see the module docstring)."""
    path: str

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def last(self) -> str:
        return self.file(LAST)

    @property
    def best(self) -> str:
        return self.file(BEST)

    @property
    def pretrained(self) -> str:
        return self.file(PRETRAINED)

    @property
    def log(self) -> str:
        return self.file(LOG)

    @property
    def args(self) -> str:
        return self.file(ARGS)

    @property
    def status(self) -> str:
        return self.file(STATUS)

    def numbered(self, epoch: int) -> str:
        return self.file(numbered(epoch))

    def picture(self, epoch: int) -> str:
        return self.file(f"reconstruction-{epoch:04d}.png")

    def numbered_checkpoints(self) -> list[str]:
        """checkpoint-N.pth files, newest epoch first."""
        found = [p for p in glob.glob(self.file("checkpoint-*.pth")) if epoch_of(p) >= 0]
        return sorted(found, key=epoch_of, reverse=True)

    def best_or_last(self) -> str | None:
        """checkpoint-best.pth, else checkpoint-last.pth, else None."""
        return next((p for p in (self.best, self.last) if os.path.isfile(p)), None)
