"""Shared test fixtures: the real CT data folder and small helpers."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny test models: threads cost more than they give


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight parallel test processes for the 2 cores)."""
    import torch

    from util.runtime import torch_threads

    old = torch.get_num_threads()
    torch_threads()
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when the folder is absent (a user's clone lacks it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real CT data not found at {SHARED_DATA} (only present in the project workspace)")
    return SHARED_DATA
