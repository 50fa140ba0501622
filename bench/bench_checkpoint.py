"""What a checkpoint costs: a ViT-L/16 MAE (TANGERINE size) with its AdamW state, 3.76 GiB.

Measured side by side, each repeat running every variant once in turn (the machine's other load then weighs on all;
the two synchronous writes alternate which goes first):
- the synchronous write without the checksum (torch.save into the temporary file, fsync, rename: the write before
  issue 29) and with it (util.checkpoint.save_atomic: the CRC32 of every byte as torch.save writes it, appended as
  the zip archive comment);
- the background writer training uses (util.checkpoint.CheckpointWriter): the stall (copying the state to the CPU)
  and the time until the file is on disk;
- verifying: our file (one CRC32 over the whole file) and the same archive without our checksum (structure and
  every record's CRC32, what a file from elsewhere or from before the change gets), in GB/s; the file is in the page
  cache, as right after a write (a cold read runs at the disk's speed, and torch.load then reads from the cache);
- loading: torch.load alone against util.checkpoint.load_checkpoint (verify + torch.load + the NaN/Inf scan), and
  that scan before (isfinite(t).all()) and now (aminmax: one read, no temporary);
- with --hashes: one-core throughput of zlib.crc32, ISA-L's crc32, SHA-256 and BLAKE2b on a 256 MiB buffer.

    python bench/bench_checkpoint.py --out_dir /scratch/ckpt_bench   # writes 2 x 3.76 GiB there, removed afterwards
    python bench/bench_checkpoint.py --hashes_only                   # the hash throughputs alone (seconds)
    python bench/bench_checkpoint.py --quick                         # tiny model (smoke test)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import models_mae3d  # noqa: E402, F401  (registers the MAE factories)
from util.nn.registry import create_model, model_names  # noqa: E402
from util.atomic import atomic_write, write_text  # noqa: E402
from util.checkpoint import CheckpointWriter, load_checkpoint, save_atomic  # noqa: E402
from util.finite import first_non_finite  # noqa: E402
from util import checkpoint_verify  # noqa: E402
from util.checkpoint_verify import verify  # noqa: E402


def training_state(model_name: str, device: str, quick: bool) -> dict:
    """{'model', 'optimizer', 'epoch', 'args'} after one AdamW step (so the optimizer holds both moments)."""
    kw = dict(depth=2, decoder_depth=1, img_size=32) if quick else {}
    with torch.device(device):
        model = create_model(model_name, **kw)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0, "args": {"model": model_name}}


def save_without_checksum(state: dict, path: str) -> None:
    """The write before checksums: torch.save into a temporary file, fsync, rename."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    atomic_write(path, write, fsync=True)


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def verify_file(path: str) -> str:
    with open(path, "rb") as f:
        return verify(f, path)


class CrcClock:
    """Adds up the seconds spent in util.checkpoint_verify's crc32 while installed (the checksum's share of a
    write, measured inside it: steadier than the difference of two whole writes on a busy machine)."""

    def __init__(self) -> None:
        self.seconds, self._crc = 0.0, checkpoint_verify.crc32

    def __call__(self, data, value=0):
        t = time.perf_counter()
        try:
            return self._crc(data, value)
        finally:
            self.seconds += time.perf_counter() - t

    def __enter__(self):
        checkpoint_verify.crc32 = self
        return self

    def __exit__(self, *exc) -> None:
        checkpoint_verify.crc32 = self._crc


def measure_writes(state: dict, folder: str, repeats: int) -> dict:
    """Seconds per repeat: sync write without / with the checksum (and its CRC32's share), background stall and
    total."""
    ours, plain = os.path.join(folder, "checkpoint-last.pth"), os.path.join(folder, "plain.pth")
    r = {k: [] for k in ("write_plain_s", "write_checksum_s", "crc_in_write_s", "stall_s", "background_total_s")}
    writer = CheckpointWriter()
    for i in range(repeats):
        for variant in ("plain", "checksum") if i % 2 == 0 else ("checksum", "plain"):  # alternate who goes first
            if variant == "plain":
                r["write_plain_s"].append(timed(save_without_checksum, state, plain))
                continue
            with CrcClock() as clock:
                r["write_checksum_s"].append(timed(save_atomic, state, ours))
            r["crc_in_write_s"].append(clock.seconds)
        t = time.perf_counter()
        writer.save(state, [ours])
        r["stall_s"].append(time.perf_counter() - t)
        writer.wait()
        r["background_total_s"].append(time.perf_counter() - t)
    del writer  # its CPU copy of the state
    r["gib"] = os.path.getsize(ours) / 2 ** 30
    return r


def scan_before(obj) -> bool:
    """The NaN/Inf scan load_checkpoint ran before aminmax: isfinite(t).all() on every floating tensor."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return all(scan_before(v) for v in items)


def measure_reads(folder: str, repeats: int) -> dict:
    """Seconds per repeat: verify ours / the plain archive, torch.load, the NaN/Inf scan before / now,
    load_checkpoint."""
    ours, plain = os.path.join(folder, "checkpoint-last.pth"), os.path.join(folder, "plain.pth")
    assert verify_file(ours) == "ours" and verify_file(plain) == "zip"
    r = {k: [] for k in ("verify_ours_s", "verify_records_s", "torch_load_s", "scan_before_s", "scan_now_s",
                         "load_checkpoint_s")}
    for _ in range(repeats):
        r["verify_ours_s"].append(timed(verify_file, ours))
        r["verify_records_s"].append(timed(verify_file, plain))
        t = time.perf_counter()
        state = torch.load(ours, map_location="cpu", weights_only=True)
        r["torch_load_s"].append(time.perf_counter() - t)
        r["scan_before_s"].append(timed(scan_before, state))
        r["scan_now_s"].append(timed(first_non_finite, state))
        del state
        r["load_checkpoint_s"].append(timed(load_checkpoint, ours))
    return r


def hash_speeds(repeats: int, mib: int = 256) -> dict:
    """GB/s (best of `repeats`) of each candidate checksum on `mib` MiB of random bytes."""
    data = memoryview(os.urandom(mib << 20))
    candidates = {"zlib.crc32": lambda: zlib.crc32(data), "sha256": lambda: hashlib.sha256(data).digest(),
                  "blake2b": lambda: hashlib.blake2b(data).digest()}
    try:
        from isal import isal_zlib
        candidates["isal crc32"] = lambda: isal_zlib.crc32(data)
    except ImportError:
        pass
    best = {k: min(timed(fn) for _ in range(repeats)) for k, fn in candidates.items()}
    return {k: len(data) / s / 1e9 for k, s in best.items()}


def report(r: dict) -> None:
    rng = lambda v: f"{min(v):.2f}-{max(v):.2f} s"  # noqa: E731
    gb = r["gib"] * 2 ** 30 / 1e9
    print(f"{r['model']} + AdamW state, {r['gib']:.2f} GiB on {r['folder']} ({r['device']}), {r['repeats']} repeats:")
    print(f"  synchronous write: without checksum {rng(r['write_plain_s'])}, with {rng(r['write_checksum_s'])}, of "
          f"which the CRC32 {rng(r['crc_in_write_s'])}")
    print(f"  background writer (with checksum): training stalls {rng(r['stall_s'])} (copy to CPU), file on disk "
          f"after {rng(r['background_total_s'])}")
    print(f"  verify ours (whole-file CRC32): {rng(r['verify_ours_s'])} = {gb / min(r['verify_ours_s']):.1f} GB/s; "
          f"a file without it (structure + record CRC32s): {rng(r['verify_records_s'])} = "
          f"{gb / min(r['verify_records_s']):.1f} GB/s")
    print(f"  NaN/Inf scan of the loaded state: isfinite().all() (before) {rng(r['scan_before_s'])}, aminmax (now) "
          f"{rng(r['scan_now_s'])}")
    print(f"  load: torch.load {rng(r['torch_load_s'])}, load_checkpoint (verify + torch.load + NaN scan) "
          f"{rng(r['load_checkpoint_s'])}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser("bench_checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mae_vit_large_patch16", choices=model_names("mae"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out_dir", default=None, help="folder on the disk to measure (default: a temporary folder)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2-block model at 32^3 (smoke test)")
    p.add_argument("--hashes", action="store_true", help="also measure the candidate checksums' throughput")
    p.add_argument("--hashes_only", action="store_true", help="only the checksums' throughput")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    r = {"repeats": args.repeats}
    if args.hashes or args.hashes_only:
        r["hash_gb_s"] = hash_speeds(args.repeats, 16 if args.quick else 256)
        print("one-core throughput: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in r["hash_gb_s"].items()))
    if not args.hashes_only:
        folder = tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.out_dir)
        try:
            r.update(measure_writes(training_state(args.model, args.device, args.quick), folder, args.repeats))
            r.update(measure_reads(folder, args.repeats))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        r.update(model=args.model, device=args.device, folder=args.out_dir or tempfile.gettempdir())
        report(r)
    if args.json:
        write_text(args.json, json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
