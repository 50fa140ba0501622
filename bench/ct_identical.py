"""A CT run before and after a change gives identical numbers: tiny runs of the demo phantoms (pretraining without
and with --cache_dir / --norm_pix_loss / another window, classification and segmentation finetuning, prediction with
embeddings) by the code of a git revision (extracted with `git archive`, the repository untouched) and by this tree,
then the SHA-256 of every weight tensor, of the predictions and of the embeddings, side by side.

    python bench/ct_identical.py --before 560155a --with 92af635   # the commit before channels (issue 32), plus a
                                                                   # fix landed since that changes seeded runs

`--with COMMIT ...` applies those commits' diffs to the before tree: changes of others that landed in between and
change the numbers on purpose (92af635: the step estimate no longer draws from the seeded generator).

Each side runs in fresh processes with OMP_NUM_THREADS=1 (a few minutes on 2 cores). Exit status 1 when any differs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = ("pre/mae_pretrained.pth", "pre_cache/mae_pretrained.pth", "cls/checkpoint-best.pth",
           "seg/checkpoint-last.pth")


def run_side(tree: str, out: str) -> dict:
    """Every run of the module doc by the code in `tree`, in `out`; {output: digest}."""
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=tree)

    def run(script, *a):
        r = subprocess.run([sys.executable, os.path.join(tree, script), *map(str, a)], cwd=out, env=env,
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{tree}: {script} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")

    subprocess.run([sys.executable, "-c", "from util.data.demo import make_demo_data; make_demo_data('demo_data')"],
                   cwd=out, env=env, check=True)
    common = ["--model", "mae_vit_tiny_patch16", "--input_size", 32, "--patch_size", 8, "--epochs", 2,
              "--warmup_epochs", 1, "--batch_size", 2, "--num_workers", 0, "--blr", 1e-3, "--device", "cpu",
              "--save_every", 0, "--vis_every", 0]
    run("main_pretrain.py", "--data_path", "demo_data/pretrain.csv", "--output_dir", "pre", *common)
    run("main_pretrain.py", "--data_path", "demo_data/pretrain.csv", "--output_dir", "pre_cache", "--cache_dir",
        "cache", "--norm_pix_loss", "--window", -1000, 400, *common)
    ft = ["--model", "vit_tiny_patch16", "--input_size", 32, "--patch_size", 8, "--epochs", 1, "--warmup_epochs", 0,
          "--batch_size", 2, "--num_workers", 0, "--device", "cpu", "--finetune", "pre/mae_pretrained.pth"]
    run("main_finetune.py", "--train_csv", "demo_data/train.csv", "--val_csv", "demo_data/val.csv", "--output_dir",
        "cls", *ft)
    run("main_finetune.py", "--train_csv", "demo_data/train.csv", "--val_csv", "demo_data/val.csv", "--output_dir",
        "seg", "--task", "segmentation", "--cache_dir", "cache", *ft)
    run("main_predict.py", "--input_csv", "demo_data/predict.csv", "--finetune", "cls/checkpoint-best.pth",
        "--output_csv", "pred.csv", "--embeddings", "emb.npy", "--num_workers", 0, "--device", "cpu")
    import torch

    digests = {}
    for name in WEIGHTS:
        ckpt = torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)
        h = hashlib.sha256()
        for k in sorted(ckpt["model"]):
            h.update(k.encode())
            h.update(ckpt["model"][k].float().numpy().tobytes())
        digests[name] = h.hexdigest()[:16]
        digests[name + " preprocess"] = json.dumps(ckpt.get("preprocess"), sort_keys=True)
    for name in ("pred.csv", "emb.npy"):
        with open(os.path.join(out, name), "rb") as f:
            digests[name] = hashlib.sha256(f.read()).hexdigest()[:16]
    return digests


def main(argv=None) -> int:
    p = argparse.ArgumentParser("ct_identical", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="git revision of the code before the change")
    p.add_argument("--with", dest="also", nargs="*", default=[], metavar="COMMIT",
                   help="commits whose diffs are applied to the before tree (changes landed since, not the one tested)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ct_identical_") as tmp:
        tree = os.path.join(tmp, "before")
        os.makedirs(tree)
        archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", args.before], capture_output=True,
                                 check=True)
        subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
        for commit in args.also:
            diff = subprocess.run(["git", "-C", ROOT, "diff", f"{commit}~1", commit], capture_output=True, check=True)
            subprocess.run(["git", "apply", "-"], cwd=tree, input=diff.stdout, check=True)
        before, after = run_side(tree, os.path.join(tmp, "out_before")), run_side(ROOT, os.path.join(tmp, "out_after"))
    differ = 0
    for name in before:
        same = before[name] == after[name]
        differ += not same
        print(f"{'same' if same else 'DIFFERENT'}  {name}: {after[name] if same else (before[name], after[name])}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
