"""How close the memory and time estimate said before the first step (util/train/budget.py) comes to what a run
really uses: real `main_pretrain.py` runs on the demo phantoms, on CPU, for several models, input and patch sizes.

Memory: the anonymous proportional set size (Pss_Anon: the run's own pages, those shared between the trainer and
its forked workers split between them; shared libraries, whose share moves with whatever else runs, left out) of
the whole process tree (the trainer and its loader workers), sampled every 50 ms; the estimate predicts what the
run adds to its process after start-up, so the table compares it with the peak minus the tree's PSS at the moment
the estimate is printed; each run trains two epochs with one loader worker and --cache_dir (a worker is forked
each epoch). Time: the estimate's seconds per step against a training step timed in this process (random batch,
AdamW, no loader) and the estimate from the block rates measured just before, both in CPU seconds of one thread,
so the other load of a shared machine does not count (with more threads, waiting threads spin and count).

    python bench/bench_memory_estimate.py     # about 10 minutes on 2 cores; writes bench/memory_estimate.json
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = [  # (model, input size, patch, batch)
    ("mae_vit_tiny_patch16", 64, 8, 4), ("mae_vit_tiny_patch16", 96, 8, 2), ("mae_vit_tiny_patch16", 128, 16, 4),
    ("mae_vit_small_patch16", 64, 8, 4), ("mae_vit_small_patch16", 96, 16, 4), ("mae_vit_small_patch16", 128, 16, 2),
    ("mae_vit_small_patch16", 96, 8, 1),
]


def tree_pss(pid: int) -> float:
    """PSS in bytes of `pid` and all its descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss_Anon:"):  # the run's own memory (shared libraries left out)
                        total += float(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def run(model: str, size: int, patch: int, batch: int, data: str, out: str, workers: int = 1, epochs: int = 2,
        cache: bool = True) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "main_pretrain.py"), "--data_path", data, "--output_dir", out,
           "--model", model, "--input_size", str(size), "--patch_size", str(patch), "--batch_size", str(batch),
           "--epochs", str(epochs), "--warmup_epochs", "0", "--num_workers", str(workers), "--print_freq", "1",
           "--vis_every", "0", "--save_every", "0", "--device", "cpu", "--resume", "none"]
    cmd += ["--cache_dir", out + "_cache"] if cache else []
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_pss(p.pid))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    base, est, secs, stamps = None, None, None, []
    for line in p.stdout:
        if line.startswith("Estimated cost"):
            base = tree_pss(p.pid)
            est = float(re.search(r"about ([\d.]+) GiB per process", line).group(1))
            m = re.search(r"about ([\d.e+-]+) s per step", line)
            secs = float(m.group(1)) if m else None
        if re.match(rf"epoch {epochs}/{epochs} \[\d+/", line):  # the second epoch reads the cache: the loader keeps up
            stamps.append(time.monotonic())
    p.wait()
    stop.set()
    measured_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    used = (peak[0] - base) / 2 ** 30 if base else None
    return dict(model=model, size=size, patch=patch, batch=batch, estimate_gib=est, measured_gib=used,
                ratio=est / used if used else None, estimate_s=secs, measured_s=measured_step,
                base_gib=base / 2 ** 30 if base else None,
                time_ratio=secs / measured_step if secs and measured_step else None, status=p.returncode)


def step_time(model: str, size: int, patch: int, batch: int) -> dict:
    """Seconds of a training step computed in this process (random batch, AdamW; no loader) against the
    estimate, with the matmul rate measured just before."""
    import torch

    import models_mae3d  # noqa: F401  (registers the MAE factories)
    from util.nn.registry import create_model
    from models_build import pretrain_workload
    from util.train.budget import estimate
    from types import SimpleNamespace

    torch.set_num_threads(1)  # one thread: CPU time is then what the step costs, whatever else runs here
    torch.manual_seed(0)
    mae = create_model(model, img_size=size, patch_size=patch)
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, size, size, size)

    def step():
        loss = mae(x)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0, n = time.process_time(), 3  # CPU seconds of all threads: the machine's other load does not count
    for _ in range(n):
        step()
    measured = (time.process_time() - t0) / n
    args = SimpleNamespace(model=model, input_size=[size] * 3, patch_size=[patch] * 3, mask_ratio=0.75,
                           batch_size=batch, precision="fp32", grad_checkpointing=False)
    est = estimate(pretrain_workload(args)[0], batch, "fp32", False, "cpu", 0, clock=time.process_time)
    return dict(estimate_s=est.seconds, measured_s=measured, time_ratio=est.seconds / measured)


def main() -> None:
    import tempfile

    import pandas as pd

    from util.data.demo import make_demo_data

    work = tempfile.mkdtemp(prefix="bench_mem_")
    paths = make_demo_data(os.path.join(work, "demo_data"), n_pretrain=8, n_labeled=8, seed=1)
    rows = []
    for model, size, patch, batch in CONFIGS:
        table = os.path.join(work, f"data_{batch}.csv")
        df = pd.read_csv(paths["pretrain"])
        df["Path"] = [os.path.join(os.path.dirname(paths["pretrain"]), x) for x in df["Path"]]
        df.iloc[:batch * 4].to_csv(table, index=False)  # 4 steps
        r = run(model, size, patch, batch, table, os.path.join(work, f"{model}_{size}_{patch}"))
        r.update(step_time(model, size, patch, batch))  # the time of the compute alone, in this process
        rows.append(r)
        print(json.dumps(r), flush=True)
    with open(os.path.join(ROOT, "bench", "memory_estimate.json"), "w") as f:
        json.dump(rows, f, indent=1)
    ok = [r for r in rows if r["ratio"]]
    print(f"memory estimate / measured: {min(r['ratio'] for r in ok):.2f} .. {max(r['ratio'] for r in ok):.2f}")
    t = [r for r in rows if r["time_ratio"]]
    if t:
        lo, hi = min(r["time_ratio"] for r in t), max(r["time_ratio"] for r in t)
        print(f"time estimate / measured: {lo:.2f} .. {hi:.2f}")


if __name__ == "__main__":
    main()
