"""The data path, measured side by side in one run: the uncached first pass and the cached training loader.

1. First pass of one CT on ONE thread (read + reorient + resample + window + cache write), the SimpleITK
   resampler against the separable one (util.volume.resample), alternating, --repeats times each.
2. Cached training loader, ONE worker process: float32 items (the contract) against the uint16 transport the
   training scripts use (cached values travel as stored, scaled and flipped on the device), alternating, with
   random crops and flips as in pretraining. Prints volumes/s per worker core, the ratio, and the worker cores
   needed to feed --target_vol_s volumes/s.

Default source: the IRCAD CT (512 x 512 x 129, ../shared/data) preprocessed to 256^3 (TANGERINE settings); the
cached part lists it --n_vols times through symlinks (the cache key is per path). --quick: a phantom at 32^3.

    python bench/bench_loader.py                      # the README's figures (a few minutes on 2 cores)
    python bench/bench_loader.py --quick              # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from util.atomic import write_text  # noqa: E402

from datasets_three_d import Custom3DDataset  # noqa: E402
from util.volume.cache import VolumeCache  # noqa: E402
from util.volume.preprocess import PreprocessConfig, cache_keys, preprocess_image  # noqa: E402
from util.data.transport import to_device  # noqa: E402
from util.volume.io import read_image  # noqa: E402

DEFAULT_SOURCE = os.path.join(ROOT, "..", "shared", "data", "ircadb01", "ct.nii.gz")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=DEFAULT_SOURCE, help="volume to use (file or DICOM folder)")
    p.add_argument("--size", type=int, default=256, help="preprocessed cube size (voxels per axis)")
    p.add_argument("--crop", type=int, default=None, help="training crop of the cached part (default: --size)")
    p.add_argument("--interpolator", default="bspline", help="PreprocessConfig.interpolator")
    p.add_argument("--repeats", type=int, default=3, help="first-pass timings per resampler")
    p.add_argument("--n_vols", type=int, default=16, help="volumes per cached epoch (symlinks to --source)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3, help="cached epochs per transport (alternating)")
    p.add_argument("--target_vol_s", type=float, default=110.0, help="GPU demand to size the worker count for")
    p.add_argument("--quick", action="store_true", help="smoke mode: phantom, 32^3, few volumes")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def make_source(args, tmp: str) -> str:
    if not args.quick:
        if not os.path.exists(args.source):
            raise SystemExit(f"{args.source}: source volume not found; pass --source PATH or use --quick.")
        return os.path.abspath(args.source)
    from util.data.demo import make_phantom

    hu, _, sp = make_phantom(np.random.default_rng(0), effusion=True)
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(sp[::-1])
    sitk.WriteImage(img, os.path.join(tmp, "phantom.nii.gz"))
    return os.path.join(tmp, "phantom.nii.gz")


def first_pass(source: str, cfg: PreprocessConfig, cache_dir: str, backend: str) -> float:
    """Seconds of one uncached pass on one thread: read, preprocess, write the uint16 cache entry."""
    t = time.perf_counter()
    arr, _ = preprocess_image(read_image(source), cfg, source, backend=backend)
    VolumeCache(cache_dir).put(cache_keys(source, cfg)[0], arr)
    return time.perf_counter() - t


def bench_first_pass(args, source: str, cfg: PreprocessConfig, tmp: str) -> dict:
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    times = {"sitk": [], "auto": []}
    for r in range(args.repeats):
        for backend in (("sitk", "auto") if r % 2 == 0 else ("auto", "sitk")):
            times[backend].append(first_pass(source, cfg, os.path.join(tmp, f"fp_{backend}_{r}"), backend))
            print(f"  first pass ({'SimpleITK' if backend == 'sitk' else 'separable'}): "
                  f"{times[backend][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"sitk_s": times["sitk"], "separable_s": times["auto"], "ratio": med["sitk"] / med["auto"]}


def links(source: str, n: int, tmp: str) -> str:
    ext = ".nii.gz" if source.endswith(".nii.gz") else os.path.splitext(source)[1]
    rows = []
    for i in range(n):
        rows.append(os.path.join(tmp, f"vol_{i:03d}{ext}"))
        os.symlink(source, rows[-1])
    with open(os.path.join(tmp, "vols.csv"), "w") as f:
        f.write("Path\n" + "\n".join(rows) + "\n")
    return os.path.join(tmp, "vols.csv")


def cached_epoch(ds, batch_size: int, epoch: int) -> float:
    """Seconds for one epoch of `ds` from one worker process (started before the timing): the worker's crop,
    flips and collate into shared memory. Scaling uint16 batches to float32 is left out: it runs on the GPU."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=1, shuffle=False,
                                         persistent_workers=True, prefetch_factor=2)
    ds.set_epoch(epoch)
    it = iter(loader)
    first = next(it)  # worker started, first batch made
    t = time.perf_counter()
    n = sum(len(b[0]) for b in it)
    return (time.perf_counter() - t) / max(n, 1) * (n + len(first[0]))


def check_same_numbers(ds, batch_size: int) -> None:
    """The uint16 batches, scaled and flipped as on the device, equal the float32 batches exactly."""
    ds.set_epoch(0)
    ds.set_transport("float32")
    want = next(iter(torch.utils.data.DataLoader(ds, batch_size=batch_size)))[0]
    ds.set_transport("uint16")
    got, _ = to_device(next(iter(torch.utils.data.DataLoader(ds, batch_size=batch_size))), "cpu")
    if not torch.equal(got, want):
        raise SystemExit("uint16 transport does not reproduce the float32 items: a bug.")


def bench_cached(args, source: str, cfg: PreprocessConfig, tmp: str) -> dict:
    csv, cache = links(source, args.n_vols, tmp), os.path.join(tmp, "cache")
    crop = args.crop or args.size
    ds = Custom3DDataset(csv, input_size=crop, preprocess=cfg, cache_dir=cache, train=True)
    cached_epoch(ds, args.batch_size, 0)  # fill the cache (and the page cache)
    check_same_numbers(ds, args.batch_size)
    rates = {"float32": [], "uint16": []}
    for e in range(args.epochs):
        for transport in (("float32", "uint16") if e % 2 == 0 else ("uint16", "float32")):
            ds.set_transport(transport)
            rates[transport].append(args.n_vols / cached_epoch(ds, args.batch_size, e + 1))
            print(f"  cached epoch ({transport}): {rates[transport][-1]:.1f} vol/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"float32_vol_s": rates["float32"], "uint16_vol_s": rates["uint16"], "ratio": med["uint16"] / med["float32"],
            "workers_needed_float32": args.target_vol_s / med["float32"],
            "workers_needed_uint16": args.target_vol_s / med["uint16"]}


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.size, args.n_vols, args.epochs, args.repeats = min(args.size, 32), 4, 2, 1
    tmp = tempfile.mkdtemp(prefix="bench_loader_")
    try:
        source = make_source(args, tmp)
        cfg = PreprocessConfig(size=(args.size,) * 3, interpolator=args.interpolator)
        shape = read_image(source).GetSize()
        print(f"source {source} {shape} -> {args.size}^3 ({args.interpolator})", flush=True)
        fp = bench_first_pass(args, source, cfg, tmp)
        cached = bench_cached(args, source, cfg, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median
    print(f"\nfirst pass, one thread: SimpleITK {med(fp['sitk_s']):.2f} s, separable {med(fp['separable_s']):.2f} s "
          f"per volume: {fp['ratio']:.1f}x faster (median of {len(fp['sitk_s'])})")
    print(f"cached loader, one worker, crop {args.crop or args.size}^3, batch {args.batch_size}: float32 "
          f"{med(cached['float32_vol_s']):.1f} vol/s, uint16 {med(cached['uint16_vol_s']):.1f} vol/s: "
          f"{cached['ratio']:.2f}x per worker core; {args.target_vol_s:g} vol/s needs "
          f"{cached['workers_needed_float32']:.1f} -> {cached['workers_needed_uint16']:.1f} worker cores")
    result = {"source": source, "size": args.size, "first_pass": fp, "cached": cached}
    if args.json:
        write_text(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
