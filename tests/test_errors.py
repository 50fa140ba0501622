"""The error boundary: user-caused errors end as one line with status 2 (a refusal), a bug keeps its traceback
(status 1)."""
import pytest
import torch

from util.checkpoint import CorruptCheckpointError, UnsafeCheckpointError
from util.cli import run_main
from util.errors import UserError
from util.volume.io import VolumeError


def _raise(exc):
    def main(_args):
        raise exc
    return main


@pytest.mark.parametrize("exc", [UserError("--epochs must be >= 1, got -3."),
                                 VolumeError("/data/a.nii.gz: the gzip stream is corrupt."),
                                 CorruptCheckpointError("ckpt.pth is truncated."),
                                 UnsafeCheckpointError("ckpt.pth needs pickle."),
                                 FileNotFoundError(2, "No such file or directory", "/data/missing.csv")])
def test_user_caused_errors_are_one_line_and_status_2(exc, capsys, monkeypatch):
    monkeypatch.delenv("MAE3D_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        run_main(_raise(exc), None)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("exc", [ValueError("not enough values to unpack (expected 3, got 2)"),
                                 KeyError("embed_dim"), TypeError("unsupported operand"), IndexError("out of range")])
def test_a_bug_keeps_its_exception_and_traceback(exc, capsys, monkeypatch):
    """A plain ValueError is a programming error, not bad input: it is re-raised unchanged (so Python prints its
    traceback), never turned into a one-line 'error:' as before."""
    monkeypatch.delenv("MAE3D_DEBUG", raising=False)
    with pytest.raises(type(exc)):
        run_main(_raise(exc), None)
    assert "error:" not in capsys.readouterr().err


class _BadVolumes(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise VolumeError(f"/data/case{i}.nii.gz: the gzip stream is corrupt (CRC mismatch).")


def test_a_user_error_raised_in_a_loader_worker_stays_one_line(capsys, monkeypatch):
    monkeypatch.delenv("MAE3D_DEBUG", raising=False)

    def main(_args):
        for _ in torch.utils.data.DataLoader(_BadVolumes(), num_workers=1):
            pass

    with pytest.raises(SystemExit) as e:
        run_main(main, None)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: /data/case0.nii.gz: the gzip stream is corrupt (CRC mismatch)."
