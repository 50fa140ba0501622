"""How long a checkpoint stalls training: a ViT-L/16 MAE (TANGERINE size) with its AdamW state, about 4 GB.

Times, with --repeats repeats: the synchronous write (util.checkpoint.save_atomic: torch.save, fsync, rename)
and the background writer training uses (util.checkpoint.CheckpointWriter): the stall (copying the state to the
CPU) and the time until the file is on disk. On a GPU the model lives on the GPU and the copy is a device-to-host
transfer; on CPU it is a memcpy.

    python bench/bench_checkpoint.py --out_dir /scratch/ckpt_bench      # writes ~4 GB there, removed afterwards
    python bench/bench_checkpoint.py --quick                             # tiny model (smoke test)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from util.atomic import write_text  # noqa: E402

import models_mae3d  # noqa: E402
from util.checkpoint import CheckpointWriter, save_atomic  # noqa: E402


def training_state(model_name: str, device: str, quick: bool) -> dict:
    """{'model', 'optimizer', 'epoch', 'args'} after one AdamW step (so the optimizer holds both moments)."""
    kw = dict(depth=2, decoder_depth=1, img_size=32) if quick else {}
    with torch.device(device):
        model = models_mae3d.MODEL_FACTORIES[model_name](**kw)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0, "args": {"model": model_name}}


def measure(state: dict, folder: str, repeats: int) -> dict:
    """Seconds: sync write, background stall and background total (min and max over repeats), file GiB."""
    path = os.path.join(folder, "checkpoint-last.pth")
    sync, stall, total = [], [], []
    writer = CheckpointWriter()
    for _ in range(repeats):
        t = time.perf_counter()
        save_atomic(state, path)
        sync.append(time.perf_counter() - t)
        t = time.perf_counter()
        writer.save(state, [path])
        stall.append(time.perf_counter() - t)
        writer.wait()
        total.append(time.perf_counter() - t)
    gib = os.path.getsize(path) / 2 ** 30
    return {"gib": gib, "sync_s": sync, "stall_s": stall, "background_total_s": total}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser("bench_checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mae_vit_large_patch16", choices=sorted(models_mae3d.MODEL_FACTORIES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out_dir", default=None, help="folder on the disk to measure (default: a temporary folder)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2-block model at 32^3 (smoke test)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.out_dir)
    try:
        state = training_state(args.model, args.device, args.quick)
        r = measure(state, folder, args.repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    r.update(model=args.model, device=args.device, folder=args.out_dir or tempfile.gettempdir())
    rng = lambda v: f"{min(v):.2f}-{max(v):.2f} s"  # noqa: E731
    print(f"{args.model} + AdamW state, {r['gib']:.2f} GiB on {r['folder']} ({args.device}):")
    print(f"  synchronous write (torch.save + fsync + rename): {rng(r['sync_s'])}")
    print(f"  background writer: training stalls {rng(r['stall_s'])} (copy to CPU), file on disk after "
          f"{rng(r['background_total_s'])}")
    if args.json:
        write_text(args.json, json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
