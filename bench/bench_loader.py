"""Data-loader throughput with and without the preprocessed-volume cache.

Default: the IRCAD CT (512 x 512 x 129, ../shared/data) preprocessed to 256^3 (TANGERINE settings), listed
--n_vols times in a CSV through symlinks in a temporary folder (the cache key is per path, so every row is its
own cache entry). For each --num_workers value it times one uncached epoch, one cache-filling epoch and
--cached_epochs cached epochs, then prints a markdown table. --quick: a small phantom at 32^3, 2 volumes.

    python bench/bench_loader.py --num_workers 0 2 4
    python bench/bench_loader.py --quick
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datasets_three_d import Custom3DDataset, PreprocessConfig  # noqa: E402

DEFAULT_SOURCE = os.path.join(ROOT, "..", "shared", "data", "ircadb01", "ct.nii.gz")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=DEFAULT_SOURCE, help="volume to repeat (file or DICOM folder)")
    p.add_argument("--size", type=int, default=256, help="preprocessed cube size (voxels per axis)")
    p.add_argument("--n_vols", type=int, default=6, help="volumes per epoch (symlinks to --source)")
    p.add_argument("--num_workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--interpolator", default="bspline", help="PreprocessConfig.interpolator")
    p.add_argument("--cached_epochs", type=int, default=3, help="cached epochs timed after the fill")
    p.add_argument("--quick", action="store_true", help="smoke mode: small phantom, 32^3, 2 volumes")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p


def make_inputs(args, tmp: str) -> str:
    """CSV of --n_vols symlinks (copies where links are not allowed) to the source volume."""
    source = os.path.abspath(args.source)
    if args.quick:
        import SimpleITK as sitk

        from util.demo import make_phantom

        hu, _, sp = make_phantom(np.random.default_rng(0), nodule=True)
        img = sitk.GetImageFromArray(hu)
        img.SetSpacing(sp[::-1])
        source = os.path.join(tmp, "phantom.nii.gz")
        sitk.WriteImage(img, source)
    if not os.path.exists(source):
        raise SystemExit(f"{source}: source volume not found; pass --source PATH or use --quick.")
    ext = ".nii.gz" if source.endswith(".nii.gz") else os.path.splitext(source)[1]
    rows = []
    for i in range(args.n_vols):
        link = os.path.join(tmp, f"vol_{i:03d}{ext}")
        try:
            os.symlink(source, link)
        except OSError:
            (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, link)
        rows.append(link)
    csv = os.path.join(tmp, "vols.csv")
    with open(csv, "w") as f:
        f.write("Path\n" + "\n".join(rows) + "\n")
    return csv


def time_epochs(ds, workers: int, batch_size: int, epochs: int = 1) -> float:
    """Seconds to iterate `epochs` epochs of `ds` (workers started inside the timing)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, shuffle=False)
    t = time.perf_counter()
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for x, _ in loader:
            assert x.dtype == torch.float32
    return time.perf_counter() - t


def run(args, csv: str, tmp: str) -> list[dict]:
    size = (args.size,) * 3
    cfg = PreprocessConfig(size=size, interpolator=args.interpolator)
    rows = []
    for w in args.num_workers:
        n = args.n_vols
        plain = Custom3DDataset(csv, input_size=size, preprocess=cfg)
        t_plain = time_epochs(plain, w, args.batch_size)
        cached = Custom3DDataset(csv, input_size=size, preprocess=cfg, cache_dir=os.path.join(tmp, f"cache_w{w}"))
        t_fill = time_epochs(cached, w, args.batch_size)
        t_cached = time_epochs(cached, w, args.batch_size, args.cached_epochs)
        rows.append(dict(workers=w, uncached_vol_s=n / t_plain, cached_vol_s=n * args.cached_epochs / t_cached,
                         fill_s=t_fill))
        print(f"workers={w}: uncached {n / t_plain:.2f} vol/s, cached {rows[-1]['cached_vol_s']:.1f} vol/s, "
              f"fill {t_fill:.1f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.size, args.n_vols, args.cached_epochs = min(args.size, 32), 2, 2
    tmp = tempfile.mkdtemp(prefix="bench_loader_")
    try:
        csv = make_inputs(args, tmp)
        rows = run(args, csv, tmp)
        entry = next(os.scandir(next(e.path for e in os.scandir(os.path.join(tmp, f"cache_w{args.num_workers[0]}"))
                                     if e.is_dir())))
        mb = entry.stat().st_size / 2 ** 20
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    src = "phantom (--quick)" if args.quick else args.source
    print(f"\nsource: {src}; output {args.size}^3 ({args.interpolator}); {args.n_vols} volumes; batch "
          f"{args.batch_size}; {cores} CPU cores; cache entry {mb:.1f} MiB\n")
    print("| workers | uncached vol/s | cached vol/s | first-epoch cache fill (s) |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['uncached_vol_s']:.2f} | {r['cached_vol_s']:.1f} | {r['fill_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
