"""Two torchrun agents on one machine (--nnodes 2, c10d rendezvous on 127.0.0.1, one process each, gloo) fill one
cache together: every row is cached once, by one of them, and the totals are printed once."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path


from helpers import ROOT, run_in_process, write_noise_ct_table as write_table

SUMMARY = re.compile(r"(\d+) done \(newly cached\), (\d+) already cached, (\d+) failed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_agents(args: list, port: int, env_extra: dict | None = None) -> list[subprocess.Popen]:
    """`torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT --node_rank K
    main_cache.py ARGS` for K = 0, 1, started as two processes, as two machines would."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    env.pop("MAE3D_FAULT", None) if not env_extra or "MAE3D_FAULT" not in env_extra else None
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                              "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id",
                              f"cache{port}", "--node_rank", str(k), "--max_restarts", "0", "--monitor_interval", "0.2",
                              str(ROOT / "main_cache.py"), *map(str, args)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
            for k in (0, 1)]


def entries(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*.vol"))}


def test_two_torchrun_agents_fill_one_cache_each_row_once(tmp_path):
    table = write_table(tmp_path, 6)
    flags = ["--csv", table, "--input_size", 8, "--workers", 1]
    procs = two_agents([*flags, "--cache_dir", tmp_path / "two"], free_port())
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    found = [m for out, _ in outs for m in SUMMARY.findall(out)]
    assert found == [("6", "0", "0")], outs  # printed once (rank 0); each row done by one rank, none twice
    assert sum("2 processes x 1 workers" in out for out, _ in outs) == 1
    assert json.loads((tmp_path / "two" / "exit_status.json").read_text())["status"] == 0
    one = run_in_process("main_cache.py", *flags, "--cache_dir", tmp_path / "one")
    assert one.returncode == 0 and entries(tmp_path / "two") == entries(tmp_path / "one") and \
        len(entries(tmp_path / "one")) == 6  # the same entry files, byte for byte
