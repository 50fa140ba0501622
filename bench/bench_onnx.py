"""CPU time per volume of an exported encoder: onnxruntime (encoder.onnx) against PyTorch (the folder's model),
side by side in one run.

For each config (SIZE:IMG, e.g. base:128 = ViT-B/16 at 128^3) a TANGERINE-shaped MAE checkpoint with random weights
is exported by main_export.py --onnx (which checks the graph against PyTorch), then `forward_features` of
models_hub.from_pretrained(DIR, encoder_only=True) and the onnxruntime session on encoder.onnx take turns on the
same random volumes (batch --batch, which of the two goes first alternating), --repeats times after one warm-up
each; both use --threads threads. Prints the median and range of each, their ratio and the largest difference
between the two outputs; with --json, writes them.

    python bench/bench_onnx.py                          # the README's figures: ViT-B/16 at 128^3 (minutes, 2 cores)
    python bench/bench_onnx.py --configs large:256 --repeats 3   # TANGERINE's ViT-L/16 at 256^3 (a large CPU)
    python bench/bench_onnx.py --quick                  # smoke run: ViT-Ti/16 at 32^3, 2 repeats
    python bench/bench_onnx.py --configs "" --load large:256   # loading a ViT-L MAE: checkpoint against folder

--load SIZE:IMG times util.checkpoint.load_checkpoint of an MAE's checkpoint (CRC32 check, torch.load, NaN/Inf
scan) against that of its model folder (SHA-256 check, safetensors, the same scan), taking turns --repeats times.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="base:128", help="comma-separated SIZE:IMG (SIZE: tiny ... huge)")
    p.add_argument("--batch", type=int, default=1, help="volumes per call")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each runtime")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of both runtimes")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--load", default=None, help="SIZE:IMG: also time loading a checkpoint against its folder")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny:32, 2 repeats")
    return p


def bench_config(size: str, img: int, args, workdir: str) -> dict:
    import numpy as np
    import onnxruntime
    import torch

    import main_export
    import models_mae3d  # noqa: F401  (registers the MAE factories)
    from util.nn.registry import create_model
    from models_hub import from_pretrained

    torch.manual_seed(0)
    mae = create_model(f"mae_vit_{size}_patch16", img_size=img)
    path, folder = os.path.join(workdir, f"{size}{img}.pth"), os.path.join(workdir, f"{size}{img}")
    torch.save({"model": mae.state_dict()}, path)
    del mae
    t0 = time.perf_counter()
    if main_export.cli_main([path, folder, "--onnx"]) != 0:
        raise SystemExit("export failed")
    export_s = time.perf_counter() - t0
    encoder, _ = from_pretrained(folder, encoder_only=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    session = onnxruntime.InferenceSession(os.path.join(folder, "encoder.onnx"), options,
                                           providers=["CPUExecutionProvider"])
    x = torch.rand(args.batch, 1, img, img, img, generator=torch.Generator().manual_seed(0))

    def run_torch():
        with torch.inference_mode():
            return encoder.forward_features(x).numpy()

    def run_ort():
        return session.run(None, {"volume": x.numpy()})[0]

    runs = {"pytorch": run_torch, "onnxruntime": run_ort}
    diff = float(np.abs(run_torch() - run_ort()).max())  # also the warm-up of both
    times = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - t) / args.batch)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"config": f"{size}:{img}", "batch": args.batch, "threads": args.threads, "export_s": export_s,
            "per_volume_s": {n: {"median": med[n], "min": min(v), "max": max(v)} for n, v in times.items()},
            "pytorch_over_onnxruntime": med["pytorch"] / med["onnxruntime"], "max_abs_diff": diff}


def bench_load(size: str, img: int, args, workdir: str) -> dict:
    import main_export
    import models_mae3d  # noqa: F401  (registers the MAE factories)
    from util.nn.registry import create_model
    from util.checkpoint import load_checkpoint, save_atomic

    mae = create_model(f"mae_vit_{size}_patch16", img_size=img)
    path, folder = os.path.join(workdir, f"load-{size}.pth"), os.path.join(workdir, f"load-{size}")
    save_atomic({"model": mae.state_dict()}, path)
    del mae
    if main_export.cli_main([path, folder]) != 0:
        raise SystemExit("export failed")
    times = {"checkpoint": [], "folder": []}
    for r in range(args.repeats + 1):  # the first round warms the page cache
        for name, source in ((("checkpoint", path), ("folder", folder)) if r % 2 else
                             (("folder", folder), ("checkpoint", path))):
            t = time.perf_counter()
            sd = load_checkpoint(source)["model"]
            if r:
                times[name].append(time.perf_counter() - t)
            del sd
    gib = os.path.getsize(path) / 2 ** 30
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"load {size}:{img} ({gib:.2f} GiB): checkpoint {med['checkpoint']:.2f} s ({min(times['checkpoint']):.2f}-"
          f"{max(times['checkpoint']):.2f}), folder {med['folder']:.2f} s ({min(times['folder']):.2f}-"
          f"{max(times['folder']):.2f}); folder / checkpoint {med['folder'] / med['checkpoint']:.2f}x", flush=True)
    return {"load": f"{size}:{img}", "gib": gib, "seconds": times}


def main(argv=None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.configs, args.repeats = "tiny:32", 2
    import torch

    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for config in filter(None, args.configs.split(",")):
            size, img = config.split(":")
            res = bench_config(size, int(img), args, workdir)
            results.append(res)
            t = res["per_volume_s"]
            print(f"{res['config']} batch {args.batch}, {args.threads} threads, per volume: PyTorch "
                  f"{t['pytorch']['median']:.3f} s ({t['pytorch']['min']:.3f}-{t['pytorch']['max']:.3f}), "
                  f"onnxruntime {t['onnxruntime']['median']:.3f} s ({t['onnxruntime']['min']:.3f}-"
                  f"{t['onnxruntime']['max']:.3f}); PyTorch / onnxruntime {res['pytorch_over_onnxruntime']:.2f}x; "
                  f"max |diff| {res['max_abs_diff']:.1e}; export {res['export_s']:.0f} s", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
        if args.load:
            size, img = args.load.split(":")
            results.append(bench_load(size, int(img), args, workdir))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
