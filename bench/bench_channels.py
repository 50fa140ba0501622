"""What channels cost the cached training loader, side by side in one process: a cached item (uint16 transport: read,
check, decompress, random crop, flips left to the device) plus its decoding as the training device does it
(util.data.transport.to_device, here on the CPU), for the plain CT configuration and for configurations of several
channels at the same input size:

- ct:        one CT channel (the configuration of every run before channels);
- ct x3:     three HU windows of the same CT (--channels lung=Path,soft=Path,bone=Path): one cache entry, read once;
- mri x4:    four MRI sequences normalised by zscore (tests/mri_study.py, the MNI brain): four entries.

The configurations take turns, --rounds times, each reading every volume once; medians of volumes/s and the
time per item relative to the CT one.

    python bench/bench_channels.py                 # 128^3, a few minutes on 2 cores
    python bench/bench_channels.py --size 64 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser("bench_channels", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--volumes", type=int, default=8)
    args = p.parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_channels_") as tmp:
            return run(args, tmp)
    finally:
        torch.set_num_threads(threads)


def run(args, tmp: str) -> dict:
    import torch

    from datasets_three_d import Custom3DDataset
    from tests.mri_study import make_study
    from util.data.demo import make_demo_data
    from util.data.transport import to_device
    from util.volume.preprocess import PreprocessConfig

    make_demo_data(os.path.join(tmp, "ct"), n_pretrain=args.volumes, n_labeled=4)
    study = make_study(os.path.join(tmp, "mri"), args.volumes)
    size = (args.size,) * 3
    setups = {
        "ct": (os.path.join(tmp, "ct", "pretrain.csv"), PreprocessConfig(size=size)),
        "ct x3": (os.path.join(tmp, "ct", "pretrain.csv"),
                  PreprocessConfig(size=size, channels="lung=Path,soft=Path,bone=Path", norm="ct",
                                   windows=(-1000, 0, -160, 240, 300, 1500))),
        "mri x4": (study["csv"], PreprocessConfig(size=size, channels="t1,t1ce,t2,flair", norm="zscore")),
    }
    sets = {}
    for name, (csv, cfg) in setups.items():
        ds = Custom3DDataset(csv, input_size=args.size, preprocess=cfg, cache_dir=os.path.join(tmp, "cache"))
        ds.set_transport("uint16")
        for i in range(len(ds)):  # fill the cache (not timed)
            ds[i]
        sets[name] = ds
    worker, device = {name: [] for name in sets}, {name: [] for name in sets}
    for r in range(args.rounds):
        for name, ds in (sets.items() if r % 2 == 0 else reversed(list(sets.items()))):
            ds.set_epoch(r + 1)
            tw = td = 0.0
            for i in range(len(ds)):
                t0 = time.perf_counter()
                item = ds[i]  # what a loader worker does
                t1 = time.perf_counter()
                to_device(tuple(x[None] if torch.is_tensor(x) else torch.tensor([x]) for x in item), "cpu")
                tw, td = tw + t1 - t0, td + time.perf_counter() - t1
            worker[name].append(len(ds) / tw)
            device[name].append(len(ds) / td)
    print(f"cached items at {args.size}^3 (uint16 transport), one thread, median of {args.rounds} rounds of "
          f"{args.volumes} volumes; the loader worker's part, and the device's part timed on this CPU:")
    for part, rates in (("loader worker", worker), ("device (CPU)", device)):
        ref = statistics.median(rates["ct"])
        for name, v in rates.items():
            med = statistics.median(v)
            runs = ", ".join(f"{x:.1f}" for x in v)
            print(f"  {part:13s} {name:7s} {med:7.1f} vol/s, time per item x{ref / med:.2f} of ct ({runs})")
    return {"worker": worker, "device": device}


if __name__ == "__main__":
    main()
