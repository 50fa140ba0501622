"""The data path, measured side by side in one run: the uncached first pass and the cached training loader.

1. First pass of one CT on ONE thread (read + reorient + resample + window + cache write), the SimpleITK
   resampler against the separable one (util.volume.resample), alternating, --repeats times each.
2. Cached training loader, ONE worker process, uint16 transport (cached levels travel as stored, flipped and
   windowed on the device), random crops and flips as in pretraining, for each cache format side by side: today's code
   (`--baseline`, a git revision with the uint16 .npy cache, extracted with `git archive` and run as it was) and this
   tree's format (HU levels, slice differences, bit-shuffle, zstd). Each side runs in a process of its own that keeps its loader; the sides take
   turns, one epoch each, --rounds times. Prints volumes/s from the wall clock and per worker core (the worker
   process's CPU time, /proc, which the other load of a shared machine disturbs far less), the ratios to today's,
   and the worker cores needed to feed --target_vol_s volumes/s.

Default sources: the four real CTs of ../shared/data (IRCAD, TotalSegmentator NIfTI x2 and DICOM) preprocessed to
256^3 (TANGERINE settings), listed --n_vols times in turn through symlinks (one entry per link, copied from one fill
per source). --quick: a phantom at 32^3, a few volumes, no baseline.

    python bench/bench_loader.py                      # the README's figures (several minutes on 2 cores)
    python bench/bench_loader.py --repeats 0          # the cached loader only
    python bench/bench_loader.py --quick              # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")
DEFAULT_SOURCES = [os.path.join(DATA, p) for p in ("ircadb01/ct.nii.gz", "totalseg/example_ct.nii.gz",
                                                   "totalseg/example_ct_sm.nii.gz", "totalseg/example_ct_dicom")]
BASELINE_REV = "02a6224"  # the last commit whose cache is uint16 .npy read memory-mapped (today's code)
NOW_FORMATS = ("zstd",)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", nargs="+", default=DEFAULT_SOURCES, help="volumes (files or DICOM folders)")
    p.add_argument("--size", type=int, default=256, help="preprocessed cube size (voxels per axis)")
    p.add_argument("--crop", type=int, default=None, help="training crop of the cached part (default: --size)")
    p.add_argument("--interpolator", default="bspline", help="PreprocessConfig.interpolator")
    p.add_argument("--repeats", type=int, default=3, help="first-pass timings per resampler (0: skip that part)")
    p.add_argument("--n_vols", type=int, default=16, help="volumes per cached epoch (symlinks to the sources)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="cached epochs per side (the sides take turns)")
    p.add_argument("--baseline", default=BASELINE_REV, help="git revision of today's code ('none': skip it)")
    p.add_argument("--formats", nargs="+", default=list(NOW_FORMATS), help="cache codecs of this tree to run")
    p.add_argument("--target_vol_s", type=float, default=110.0, help="GPU demand to size the worker count for")
    p.add_argument("--quick", action="store_true", help="smoke mode: phantom, 32^3, few volumes, no baseline")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--serve", nargs=4, metavar=("TREE", "CSV", "CACHE", "SETTINGS"), help=argparse.SUPPRESS)
    return p


# ---- one side of the cached comparison: a process of its own, run in TREE (this tree or the baseline's) -------
def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def serve(tree: str, csv: str, cache: str, settings: str) -> None:
    """Fill the cache of `csv` (one preprocessing per source, copied to the other links), then answer lines
    'EPOCH BATCH' on stdin with one JSON line {'n', 'wall_s', 'cpu_s'} per epoch of one loader worker."""
    sys.path.insert(0, tree)
    import numpy as np  # noqa: F401 (imported before torch, as the scripts do)
    import torch

    from datasets_three_d import Custom3DDataset
    from util.volume.preprocess import PreprocessConfig, cache_keys, load_cached

    spec = json.loads(settings)
    cfg = PreprocessConfig(**spec["cfg"])
    if spec.get("codec"):
        from util.volume.cache import CacheSettings, VolumeCache

        store = VolumeCache(cache, CacheSettings(codec=spec["codec"]))
    else:
        from util.volume.cache import VolumeCache

        store = VolumeCache(cache)
    first = {}
    for link in open(csv).read().split()[1:]:
        src = os.path.realpath(link)
        entry = store.path(cache_keys(link, cfg)[0])
        if src not in first:
            load_cached(link, cfg, store, decoded=False)
            first[src] = entry
        elif not os.path.exists(entry):
            os.makedirs(os.path.dirname(entry), exist_ok=True)
            shutil.copyfile(first[src], entry)
    ds = Custom3DDataset(csv, input_size=spec["crop"], preprocess=cfg, cache_dir=cache, train=True)
    ds.set_transport("uint16")
    print(json.dumps({"entry_bytes": {s: os.path.getsize(e) for s, e in first.items()}}), flush=True)
    loader = None
    for line in sys.stdin:
        epoch, batch = (int(v) for v in line.split())
        if loader is None:
            loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=1, shuffle=False,
                                                 persistent_workers=True, prefetch_factor=2)
        ds.set_epoch(epoch)
        it = iter(loader)
        head = next(it)  # worker started, first batch made: not timed
        pid = it._workers[0].pid if hasattr(it, "_workers") else None
        c0, t0 = _cpu_seconds(pid), time.perf_counter()
        n = sum(len(b[0]) for b in it)
        wall, c1 = time.perf_counter() - t0, _cpu_seconds(pid)
        print(json.dumps({"n": n, "head": len(head[0]), "wall_s": wall,
                          "cpu_s": None if c0 is None or c1 is None else c1 - c0}), flush=True)


# ---- the driver ----------------------------------------------------------------------------------------------
def make_sources(args, tmp: str) -> list[str]:
    if not args.quick:
        missing = [s for s in args.sources if not os.path.exists(s)]
        if missing:
            raise SystemExit(f"{missing[0]}: source volume not found; pass --sources PATH ... or use --quick.")
        return [os.path.abspath(s) for s in args.sources]
    import numpy as np
    import SimpleITK as sitk

    sys.path.insert(0, ROOT)
    from util.data.demo import make_phantom

    hu, _, sp = make_phantom(np.random.default_rng(0), effusion=True)
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(sp[::-1])
    sitk.WriteImage(img, os.path.join(tmp, "phantom.nii.gz"))
    return [os.path.join(tmp, "phantom.nii.gz")]


def bench_first_pass(args, source: str, tmp: str) -> dict:
    sys.path.insert(0, ROOT)
    import SimpleITK as sitk
    import torch

    from util.volume.cache import VolumeCache
    from util.volume.io import read_image
    from util.volume.preprocess import PreprocessConfig, cache_keys, preprocess_image

    cfg = PreprocessConfig(size=(args.size,) * 3, interpolator=args.interpolator)
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    times = {"sitk": [], "auto": []}
    for r in range(args.repeats):
        for backend in (("sitk", "auto") if r % 2 == 0 else ("auto", "sitk")):
            t = time.perf_counter()
            store = VolumeCache(os.path.join(tmp, f"fp_{backend}_{r}"))
            hu_cfg = cfg.with_overrides(window=store.settings.hu_range())  # what load_cached stores: HU
            arr, _ = preprocess_image(read_image(source), hu_cfg, source, backend=backend)
            store.put(cache_keys(source, cfg)[0], arr)
            times[backend].append(time.perf_counter() - t)
            print(f"  first pass ({'SimpleITK' if backend == 'sitk' else 'separable'}): "
                  f"{times[backend][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"sitk_s": times["sitk"], "separable_s": times["auto"], "ratio": med["sitk"] / med["auto"]}


def links(sources: list[str], n: int, tmp: str) -> str:
    rows = []
    for i in range(n):
        src = sources[i % len(sources)]
        ext = ".nii.gz" if src.endswith(".nii.gz") else os.path.splitext(src)[1]
        rows.append(os.path.join(tmp, f"vol_{i:03d}{ext}"))
        os.symlink(src, rows[-1])
    with open(os.path.join(tmp, "vols.csv"), "w") as f:
        f.write("Path\n" + "\n".join(rows) + "\n")
    return os.path.join(tmp, "vols.csv")


def baseline_tree(rev: str, tmp: str) -> str:
    """Today's code: `git archive REV` of this repository, unpacked under `tmp` (the repository is not touched)."""
    out = os.path.join(tmp, "baseline")
    os.makedirs(out)
    archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", rev], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", out], input=archive.stdout, check=True)
    return out


class Side:
    """One loader process: `name` (npy = today's code, or a codec of this tree), started and filled."""

    def __init__(self, name: str, tree: str, csv: str, cache: str, spec: dict) -> None:
        self.name, self.wall, self.cpu = name, [], []
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", tree, csv, cache,
                                      json.dumps(spec)], cwd=tree, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.entry_bytes = self._answer()["entry_bytes"]

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"bench_loader: the {self.name} side stopped (see its error above).")
        return json.loads(line)

    def epoch(self, epoch: int, batch: int) -> None:
        self.proc.stdin.write(f"{epoch} {batch}\n")
        self.proc.stdin.flush()
        r = self._answer()
        self.wall.append(r["n"] / r["wall_s"])
        if r["cpu_s"]:
            self.cpu.append(r["n"] / r["cpu_s"])
        cpu = f", {self.cpu[-1]:.1f} vol/s per worker core" if r["cpu_s"] else ""
        print(f"  cached epoch ({self.name}): {self.wall[-1]:.1f} vol/s{cpu}", flush=True)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def bench_cached(args, sources: list[str], tmp: str) -> dict:
    csv = links(sources, args.n_vols, tmp)
    spec = {"cfg": {"size": [args.size] * 3, "interpolator": args.interpolator}, "crop": args.crop or args.size}
    plan = [(f, ROOT, {**spec, "codec": f}) for f in args.formats]
    if args.baseline != "none":
        plan.insert(0, ("npy", baseline_tree(args.baseline, tmp), spec))
    sides = []
    try:
        for name, tree, s in plan:
            sides.append(Side(name, tree, csv, os.path.join(tmp, f"cache_{name}"), s))
        for r in range(args.rounds + 1):  # round 0 warms the page cache and the loaders: not counted
            for side in (sides if r % 2 == 0 else sides[::-1]):
                side.epoch(r, args.batch_size)
                if r == 0:
                    side.wall.clear(), side.cpu.clear()
    finally:
        for side in sides:
            side.close()
    out, med = {}, statistics.median
    ref = sides[0]
    for side in sides:
        per_core = med(side.cpu) if side.cpu else med(side.wall)
        out[side.name] = {"vol_s": side.wall, "vol_s_per_core": side.cpu, "entry_bytes": side.entry_bytes,
                          "ratio_wall": med(side.wall) / med(ref.wall),
                          "ratio_per_core": per_core / (med(ref.cpu) if ref.cpu else med(ref.wall)),
                          "workers_needed": args.target_vol_s / per_core}
    return out


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return {}
    if args.quick:
        args.size, args.n_vols, args.rounds, args.repeats = min(args.size, 32), 4, 2, min(args.repeats, 1)
        args.batch_size = min(args.batch_size, 2)  # two batches an epoch: the first is not timed
        args.baseline = "none" if args.baseline == BASELINE_REV else args.baseline
    tmp = tempfile.mkdtemp(prefix="bench_loader_")
    try:
        sources = make_sources(args, tmp)
        print(f"sources {', '.join(sources)} -> {args.size}^3 ({args.interpolator})", flush=True)
        fp = bench_first_pass(args, sources[0], tmp) if args.repeats > 0 else None
        cached = bench_cached(args, sources, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median
    if fp:
        print(f"\nfirst pass, one thread: SimpleITK {med(fp['sitk_s']):.2f} s, separable {med(fp['separable_s']):.2f}"
              f" s per volume: {fp['ratio']:.1f}x faster (median of {len(fp['sitk_s'])})")
    ref = next(iter(cached))
    for name, c in cached.items():
        mib = statistics.mean(c["entry_bytes"].values()) / 2 ** 20
        cores = f"{med(c['vol_s_per_core']):.1f} vol/s per worker core" if c["vol_s_per_core"] else "no CPU times"
        print(f"cached loader ({name}), one worker, crop {args.crop or args.size}^3, batch {args.batch_size}: "
              f"{med(c['vol_s']):.1f} vol/s, {cores} (x{c['ratio_per_core']:.2f} of {ref} per core, "
              f"x{c['ratio_wall']:.2f} wall); {mib:.1f} MiB per volume; {args.target_vol_s:g} vol/s needs "
              f"{c['workers_needed']:.1f} worker cores (median of {len(c['vol_s'])})")
    result = {"sources": sources, "size": args.size, "baseline": args.baseline, "first_pass": fp, "cached": cached}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
