"""The cache's storage formats side by side on the real CTs: bytes per volume, error against today's entry, and the
CPU time to write and to read one entry (read + checksum + decompress), with repeats, alternating formats.

Formats: `npy` (today: uint16 at 65535 levels of the window, read memory-mapped and copied into memory as the
loader does), `zstd` (format 2: HU at the default 1-HU step, util.volume.cache), and the alternatives not taken:
`lz4` (HU levels, bit-shuffle, no slice differences) and `zstd-window` (the window's levels at 1 HU, clipped, which
one window only can read). Also the cost of the
CRC-32 alone (ISA-L) on a zstd entry. Default sources: the four real CTs of ../shared/data at 256^3.

    python bench/bench_cache_format.py               # the README's figures (about a minute on 2 cores)
    python bench/bench_cache_format.py --size 64     # quicker
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

import blosc2  # noqa: E402
import numpy as np  # noqa: E402

from bench.bench_loader import DEFAULT_SOURCES  # noqa: E402
from util.volume import cache_format  # noqa: E402
from util.volume.cache import QMAX, CacheSettings, VolumeCache, decode, encode  # noqa: E402
from util.volume.preprocess import PreprocessConfig, load_volume  # noqa: E402


def cpu(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser("bench_cache_format", description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", nargs="+", default=DEFAULT_SOURCES)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cfg = PreprocessConfig(size=(args.size,) * 3)
    tmp = tempfile.mkdtemp(prefix="bench_cache_format_")
    results = {}
    try:
        src = os.path.join(tmp, "src.txt")
        open(src, "w").close()
        caches = {"zstd": VolumeCache(os.path.join(tmp, "zstd"))}
        lz4 = blosc2.Codec.LZ4, 5, False  # the alternative: registered here only
        cache_format.CODECS.setdefault("lz4", lz4)
        caches["lz4"] = VolumeCache(os.path.join(tmp, "lz4"), CacheSettings(codec="lz4"))
        for source in args.sources:
            x = load_volume(source, cfg)
            today = encode(x)  # uint16 at 65535 levels
            npy = os.path.join(tmp, "today.npy")
            np.save(npy, today)
            row = {"npy": {"bytes": os.path.getsize(npy), "hu_error": 0.0}}
            width = cfg.window[1] - cfg.window[0]
            times = {f: {"write": [], "read": []} for f in ("npy", "zstd", "lz4")}
            hu = load_volume(source, cfg.with_overrides(window=CacheSettings().hu_range()))  # what the cache keeps
            for f, store in caches.items():
                path = store.put((src, source, f), hu)
                back = decode(store.get((src, source, f)), store.window_map(cfg.window))
                row[f] = {"bytes": os.path.getsize(path),
                          "hu_error": float(np.abs(back.astype(np.float64) - decode(today)).max()) * width}
            for r in range(args.repeats):  # alternating order, CPU time of this process
                for f in (("npy", "zstd", "lz4") if r % 2 == 0 else ("lz4", "zstd", "npy")):
                    if f == "npy":
                        times[f]["write"] += cpu(lambda: np.save(npy, encode(x)), 1)
                        times[f]["read"] += cpu(lambda: np.array(np.load(npy, mmap_mode="r")), 1)
                    else:
                        store = caches[f]
                        times[f]["write"] += cpu(lambda: store.put((src, source, f), hu), 1)
                        times[f]["read"] += cpu(lambda: store.get((src, source, f)), 1)
            for f in times:
                row[f].update({k + "_ms": 1e3 * statistics.median(v) for k, v in times[f].items()})
            data = bytes(cache_format.read(caches["zstd"].path((src, source, "zstd"))))
            row["zstd"]["crc_ms"] = 1e3 * statistics.median(cpu(lambda: cache_format.crc32(data), args.repeats))
            windowed = caches["zstd"].put_stored((src, source, "window"), encode(x, round(width)), round(width))
            row["zstd-window"] = {"bytes": os.path.getsize(windowed)}
            results[source] = row
            print(f"{os.path.basename(source.rstrip('/'))}: " + ", ".join(
                f"{f} {v['bytes'] / 2 ** 20:.2f} MiB ({v['bytes'] / row['npy']['bytes']:.3f}x"
                + (f", write {v['write_ms']:.0f} ms, read {v['read_ms']:.1f} ms CPU" if "read_ms" in v else "")
                + (f", max {v['hu_error']:.3f} HU from today's" if f in ("zstd", "lz4") else "") + ")"
                for f, v in row.items()) + f"; CRC-32 of a zstd entry {row['zstd']['crc_ms']:.2f} ms", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mean = {f: statistics.mean(r[f]["bytes"] for r in results.values()) for f in ("npy", "zstd", "lz4", "zstd-window")}
    print("\nmean per volume: " + ", ".join(f"{f} {b / 2 ** 20:.2f} MiB ({b / mean['npy']:.3f}x)"
                                            for f, b in mean.items()))
    worst = {f: max(r[f]["bytes"] / r["npy"]["bytes"] for r in results.values()) for f in ("zstd", "lz4")}
    print("largest ratio: " + ", ".join(f"{f} {v:.3f}x" for f, v in worst.items()) +
          f"; error against today's entry at most {max(r[f]['hu_error'] for r in results.values() for f in worst):.3f}"
          f" HU (the 1-HU step's 0.5 HU plus today's own {0.5 * 2000 / QMAX:.4f} HU)")
    out = {"size": args.size, "sources": results, "mean_bytes": mean, "largest_ratio": worst}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
