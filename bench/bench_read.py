"""Reading a .nii.gz and cutting lesion boxes, today's code against this tree, side by side in one run.

1. Read: a plain SimpleITK read (no check), today's checked read (zlib decompresses the file to verify its CRC and
   length, then ITK decompresses it again) and this tree's (ISA-L decompresses once, the image is made from the
   checked bytes), taking turns --repeats times on each real CT; then the first pass of the IRCAD CT (read and
   preprocess to 256^3) with either read.
2. Lesion boxes: today's (SimpleITK resampling of the region under the box) against this tree's (the separable
   resampler), on the IRCAD organ centroids, the TotalSegmentator labels' centroids (RAS scan) and points of the
   DICOM series, for several box sizes and both separable interpolators; per-box times, their ratio, and the
   largest difference between the two crops as a fraction of the crop's value range.

Today's code is util/volume/io.py and util/volume/roi.py at --baseline (a git revision), loaded from `git show`.
Both sides run on --threads threads (SimpleITK and torch; default 1: the cost per worker core).

    python bench/bench_read.py                 # the README's figures (about 2 minutes on 2 busy cores)
    python bench/bench_read.py --quick         # smoke run: the IRCAD CT, 2 repeats, 2 organs
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "..", "shared", "data")
BASELINE_REV = "d1edfd5"  # the last commit before one decompression per read and separable lesion boxes
CTS = ("ircadb01/ct.nii.gz", "totalseg/example_ct.nii.gz", "totalseg/example_ct_sm.nii.gz")
ORGANS = ("liver", "spleen", "leftkidney", "rightkidney", "leftlung", "rightlung", "bone")
BOXES = (((48.0, 48.0, 48.0), (24, 24, 24)), ((64.0, 64.0, 64.0), (32, 32, 32)), ((50.0, 50.0, 50.0), (64, 64, 64)))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_read", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default=BASELINE_REV, help="git revision of today's code")
    p.add_argument("--repeats", type=int, default=7, help="turns per side")
    p.add_argument("--threads", type=int, default=1, help="SimpleITK and torch threads on both sides")
    p.add_argument("--quick", action="store_true", help="smoke run: the IRCAD CT only, 2 repeats, 2 organs")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def load_baseline(rev: str, name: str):
    """util/volume/<name>.py of git revision `rev` as a module of its own (it imports only util.errors and
    util.volume.resample's SITK_INTERPOLATORS, which this tree still has)."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:util/volume/{name}.py"], capture_output=True, text=True,
                         check=True).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="bench_read_"), f"baseline_{name}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def turns(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each callable, taking turns (one call of each per round), `repeats` rounds."""
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


def bench_reads(old_io, new_read, sources: list[str], repeats: int) -> list[dict]:
    import SimpleITK as sitk

    rows = []
    for src in sources:
        t = turns({"plain": lambda: sitk.ReadImage(src), "today": lambda: old_io.read_image(src),
                   "now": lambda: new_read(src)}, repeats)
        med = {k: statistics.median(v) for k, v in t.items()}
        rows.append({"file": os.path.relpath(src, DATA), "median_s": med, "min_s": {k: min(v) for k, v in t.items()},
                     "today_over_plain": med["today"] / med["plain"], "now_over_plain": med["now"] / med["plain"],
                     "today_over_now": med["today"] / med["now"]})
        print(f"read {rows[-1]['file']:32s} plain {med['plain']:.3f} s  today {med['today']:.3f} s "
              f"({rows[-1]['today_over_plain']:.2f}x plain)  now {med['now']:.3f} s "
              f"({rows[-1]['now_over_plain']:.2f}x plain)  today/now {rows[-1]['today_over_now']:.2f}x", flush=True)
    return rows


def bench_first_pass(old_io, new_read, src: str, repeats: int) -> dict:
    """Read + preprocess to 256^3 (TANGERINE settings): only the read differs between the sides (the resampling of
    a volume of 3+ slices is unchanged)."""
    from util.volume.preprocess import PreprocessConfig, preprocess_image

    cfg = PreprocessConfig()
    t = turns({"today": lambda: preprocess_image(old_io.read_image(src), cfg, src),
               "now": lambda: preprocess_image(new_read(src), cfg, src)}, repeats)
    med = {k: statistics.median(v) for k, v in t.items()}
    print(f"first pass {os.path.relpath(src, DATA)} -> 256^3: today {med['today']:.3f} s  now {med['now']:.3f} s  "
          f"{med['today'] / med['now']:.2f}x", flush=True)
    return {"file": os.path.relpath(src, DATA), "median_s": med, "speedup": med["today"] / med["now"]}


def lesion_points(quick: bool) -> list[tuple[str, object, object]]:
    """(name, scan, LPS point) of the organ centroids, TotalSegmentator labels and DICOM points."""
    import numpy as np
    import SimpleITK as sitk

    from util.volume.roi import label_centroid

    ct = sitk.ReadImage(os.path.join(DATA, "ircadb01", "ct.nii.gz"))
    out = [(o, ct, label_centroid(sitk.ReadImage(os.path.join(DATA, "ircadb01", f"mask_{o}.nii.gz")), 1))
           for o in (ORGANS[:2] if quick else ORGANS)]
    if quick:
        return out
    ts = os.path.join(DATA, "totalseg")
    tct = sitk.ReadImage(os.path.join(ts, "example_ct.nii.gz"))
    seg = sitk.ReadImage(os.path.join(ts, "example_seg.nii.gz"))
    arr = sitk.GetArrayFromImage(seg)
    big = sorted(np.unique(arr)[1:], key=lambda v: -(arr == v).sum())[:3]
    out += [(f"totalseg_{v}", tct, label_centroid(seg, int(v))) for v in big]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(os.path.join(ts, "example_ct_dicom")))
    dicom = reader.Execute()
    out += [(f"dicom_{k}", dicom, dicom.TransformContinuousIndexToPhysicalPoint(i))
            for k, i in enumerate(([256.0, 256.0, 10.3], [120.3, 300.7, 3.2], [500.0, 20.0, 18.5]))]
    return out


def bench_boxes(old_roi, new_roi, points: list, repeats: int) -> list[dict]:
    import numpy as np

    rows = []
    for (mm, n), interp in [(b, i) for b in BOXES for i in ("bspline", "linear")]:
        def side(module):
            return lambda: [module.extract_roi(img, p, mm, n, interpolator=interp) for _, img, p in points]
        side(new_roi)()  # warm: the prefilter inverses of the region sizes are cached per process
        t = turns({"today": side(old_roi), "now": side(new_roi)}, repeats)
        per_box = {k: statistics.median(v) / len(points) for k, v in t.items()}
        worst = 0.0
        for _, img, p in points:
            a = old_roi.extract_roi(img, p, mm, n, interpolator=interp)
            b = new_roi.extract_roi(img, p, mm, n, interpolator=interp)
            worst = max(worst, float(np.abs(a - b).max()) / max(float(a.max() - a.min()), 1e-6))
        rows.append({"box_mm": mm, "size": n, "interpolator": interp, "boxes": len(points), "per_box_ms":
                     {k: v * 1e3 for k, v in per_box.items()}, "speedup": per_box["today"] / per_box["now"],
                     "max_diff_over_range": worst})
        print(f"box {mm[0]:.0f} mm -> {n[0]}^3 {interp:8s} today {per_box['today'] * 1e3:6.1f} ms  now "
              f"{per_box['now'] * 1e3:5.1f} ms  {rows[-1]['speedup']:5.1f}x  max |diff| / range {worst:.1e}",
              flush=True)
    return rows


def main(args) -> dict:
    import SimpleITK as sitk
    import torch

    from util.volume import roi as new_roi
    from util.volume.io import read_image

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    torch.set_num_threads(args.threads)
    old_io, old_roi = load_baseline(args.baseline, "io"), load_baseline(args.baseline, "roi")
    repeats = 2 if args.quick else args.repeats
    sources = [os.path.join(DATA, c) for c in (CTS[:1] if args.quick else CTS)]
    print(f"baseline {args.baseline}, {repeats} turns per side, {args.threads} thread(s)", flush=True)
    out = {"baseline": args.baseline, "repeats": repeats, "threads": args.threads,
           "reads": bench_reads(old_io, read_image, sources, repeats),
           "first_pass": bench_first_pass(old_io, read_image, sources[0], max(2, repeats // 2)),
           "boxes": bench_boxes(old_roi, new_roi, lesion_points(args.quick), repeats)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
