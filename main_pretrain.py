"""MAE pretraining on CT volumes. `python main_pretrain.py` runs the demo; torchrun scales it to many GPUs.

    torchrun --standalone --nproc_per_node=4 main_pretrain.py --data_path scans.csv --output_dir out/
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

from util import args as cli_args

DEMO_DIR = "demo_data"
# Demo: 8^3 patches (512 tokens of a 64^3 phantom, fine enough for lungs and body outline to come back), about
# 150 steps; on the idle 2-core machine it takes about 2 min and reaches a held-out ratio under 0.5 (README).
DEMO_PRESET = dict(model="mae_vit_tiny_patch16", input_size=[64, 64, 64], patch_size=[8, 8, 8], epochs=25,
                   warmup_epochs=2, batch_size=4, blr=0.064, output_dir=os.path.join("output_dir", "demo_pretrain"),
                   save_every=25, vis_every=5, num_workers=min(2, cli_args.default_num_workers()),
                   val_path=os.path.join(DEMO_DIR, "val.csv"))
TANGERINE_FLAGS = ("model", "input_size", "patch_size", "mask_ratio", "epochs", "warmup_epochs", "blr")
EXAMPLES = """  python main_pretrain.py                      # demo: tiny MAE on built-in CT phantoms
  torchrun --standalone --nproc_per_node=4 main_pretrain.py --data_path scans.csv --cache_dir /scratch/cache \\
      --output_dir out/                        # the TANGERINE recipe (ViT-L/16, 256^3, 400 epochs)
  python main_pretrain.py --data_path scans.csv --model mae_vit_base_patch16 --input_size 160 --norm_pix_loss
"""


def get_args_parser():
    p = cli_args.make_parser("main_pretrain.py", "3D MAE pretraining (defaults: the TANGERINE recipe).", EXAMPLES)
    g = p.add_argument_group("data and masked autoencoder")
    g.add_argument("--data_path", default=None, help="CSV with a Path column, or a text file with one path per line "
                                                     "(omit it to run the built-in demo)")
    g.add_argument("--val_path", default=None, help="held-out volumes (CSV): masked-patch MSE against the trivial "
                                                    "reconstruction every --vis_every epochs, and the picture's volume")
    g.add_argument("--init", default=None, help="continue pretraining from the weights of this MAE checkpoint "
                   "(ours, TANGERINE, the original project's): fresh optimizer and schedule, recorded in the recipe; "
                   "a restart resumes checkpoint-last.pth instead")
    g.add_argument("--mask_ratio", type=cli_args.bounded(float, min=0, max=1, min_open=True, max_open=True),
                   default=0.75, help="share of patches removed from each volume")
    g.add_argument("--norm_pix_loss", action="store_true", help="regress per-patch normalised voxels")
    g.add_argument("--intensity_jitter", type=cli_args.bounded(float, min=0, max=1, max_open=True), default=0.0,
                   help="random intensity scale/shift (0: flips only)")
    g.add_argument("--skip_bad", action="store_true", help="skip unreadable volumes (listed in log.txt) instead of "
                                                           "stopping")
    g.add_argument("--save_every", type=cli_args.bounded(int, min=0), default=20,
                   help="also keep checkpoint-N.pth every N epochs (0: only checkpoint-last.pth)")
    g.add_argument("--vis_every", type=cli_args.bounded(int, min=0), default=20,
                   help="reconstruction picture (and --val_path score) every N epochs (0: never)")
    cli_args.add_training_args(p, cli_args.MAE_MODELS, "mae_vit_large_patch16", blr=1.5e-4, epochs=400,
                               warmup_epochs=40, min_lr=0.0, output_dir=os.path.join("output_dir", "pretrain"))
    cli_args.add_preprocess_args(p)
    return p


def parse_args(argv: list[str] | None = None):
    """Parse `argv` (default: the command line); the demo preset when no --data_path is given, else say which
    TANGERINE recipe defaults apply (only those not typed); then the flags' cross checks."""
    def presets(args) -> None:
        args.demo = args.data_path is None
        if args.demo:
            cli_args.apply_preset(args, DEMO_PRESET, "demo")
        else:
            cli_args.announce_defaults(args, "TANGERINE recipe", TANGERINE_FLAGS)
    return cli_args.parse(get_args_parser(), argv, presets)


cli_args.parse_before_imports(__name__, get_args_parser)  # --help and bad values: answered before torch loads

# the heavy imports come after the parser on purpose (`--help` in a fraction of a second, not 10 s and 1 GB)
import torch  # noqa: E402

import models_mae3d  # noqa: E402
from datasets_three_d import Custom3DDataset  # noqa: E402
from engine_pretrain import MaskedReconstruction, evaluate_reconstruction, reconstruction_picture  # noqa: E402
from models_build import pretrain_workload  # noqa: E402
from util.train import budget, trainer  # noqa: E402
from util.atomic import atomic_write, write_text  # noqa: E402
from util.checkpoint import CheckpointNotFoundError, load_checkpoint, save_atomic  # noqa: E402
from util.distributed import all_gather_objects, barrier, cleanup, is_main_process  # noqa: E402
from util.errors import UserError, run_main  # noqa: E402
from util.logger import TBLogger, describe_outputs  # noqa: E402
from util.run_folder import RunFolder  # noqa: E402
from util.train.fit import TrainData, args_record, fit  # noqa: E402
from util.train.loop import TrainParts  # noqa: E402
from util.train.lr_decay import param_groups_weight_decay  # noqa: E402
from util.data.sampler import EvalShardSampler  # noqa: E402


def build_data(args, preprocess):
    """Training set, sampler and loader; a held-out loader for --val_path (None without it)."""
    if args.demo:
        from util.data.demo import make_demo_data

        if is_main_process():
            make_demo_data(DEMO_DIR)
        barrier()
        args.data_path = args.data_path or os.path.join(DEMO_DIR, "pretrain.csv")
    ds = Custom3DDataset(args.data_path, input_size=args.input_size, train=True, preprocess=preprocess,
                         cache_dir=args.cache_dir, seed=args.seed, skip_bad=args.skip_bad,
                         intensity_jitter=args.intensity_jitter, crops_per_volume=args.crops_per_volume)
    sampler, loader = trainer.train_loader(ds, args, args.data_path)
    shown = Custom3DDataset(args.val_path or args.data_path, input_size=args.input_size, train=False,
                            preprocess=preprocess, cache_dir=args.cache_dir, skip_bad=args.skip_bad)
    val = None
    if args.val_path:
        val = torch.utils.data.DataLoader(shown, batch_size=args.batch_size, num_workers=0,
                                          sampler=EvalShardSampler(len(shown), args.rank, args.world_size))
    return ds, sampler, loader, shown, val


def build_model(args):
    model = models_mae3d.MODEL_FACTORIES[args.model](img_size=tuple(args.input_size), patch_size=tuple(args.patch_size),
                                                     norm_pix_loss=args.norm_pix_loss)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(args.device)
    if args.compile:
        for blk in list(model.blocks) + list(model.decoder_blocks):
            blk.compile(dynamic=False)  # static shapes: one graph per (block, sequence length)
    return model


def step_cost(args) -> None:
    """Say what a step costs (memory; on CPU also time) and refuse a run that cannot fit (util.train.budget)."""
    if not args.demo and "model" not in args.explicit and not args.device.startswith("cuda"):
        print(f"WARNING: no --model typed, so this is the TANGERINE recipe: {args.model} at "
              f"{'x'.join(map(str, args.input_size))}, made for GPUs. For a first run on a CPU try --model "
              f"mae_vit_tiny_patch16 --input_size 64 --patch_size 8 (the demo's model).", flush=True)
    workload, what = pretrain_workload(args)
    budget.check_run(args, workload, what, "--batch_size, --input_size or --model (a smaller one), or add "
                                           "--grad_checkpointing")


class PretrainEpochs:
    """Pretraining's part of the epoch skeleton (util.train.fit): every checkpoint holds the recipe and the
    preprocessing; every --save_every epochs a numbered checkpoint too; every --vis_every epochs (and the last) the
    held-out score and the reconstruction picture. `epoch` counts from 0 (as checkpoints store it); every name
    and line counts from 1."""

    def __init__(self, args, model, dataset, recipe: dict, preprocess, tb, shown, val):
        self.args, self.model, self.dataset, self.recipe, self.preprocess = args, model, dataset, recipe, preprocess
        self.tb, self.shown, self.val, self.folder = tb, shown, val, RunFolder(args.output_dir)

    def checkpoint_fields(self) -> dict:
        return dict(recipe=self.recipe, preprocess=self.preprocess.to_dict())

    def end_epoch(self, epoch: int, stats: dict) -> tuple[dict, list[str]]:
        args, done = self.args, epoch + 1
        stats["epoch"] = done  # log.txt counts epochs from 1, like the console and the file names
        if self.dataset.bad_files:
            stats["skipped_files"] = list(self.dataset.bad_files)
        also = []
        if args.save_every and done % args.save_every == 0 and done < args.epochs:  # the last: link_final_checkpoint
            also.append(self.folder.numbered(done))
        if args.vis_every and (done % args.vis_every == 0 or done == args.epochs):
            self.picture(done, stats)
        return stats, also

    def picture(self, done: int, stats: dict) -> None:
        """The held-out score (every rank) and the reconstruction picture of the shown volume (rank 0)."""
        args, model = self.args, self.model
        title = f"epoch {done}/{args.epochs}  train loss {stats['loss']:.4f}"
        if self.val is not None:
            score = evaluate_reconstruction(model, self.val, args.mask_ratio, args.device, args.precision, args.seed)
            stats.update({f"val_{k}": v for k, v in score.items()})
            title += f"  held-out MSE {score['recon_mse']:.4f} (trivial {score['baseline_mse']:.4f})"
            print(f"epoch {done}/{args.epochs}: held-out masked-patch MSE {score['recon_mse']:.4g}, trivial "
                  f"reconstruction {score['baseline_mse']:.4g} (ratio {score['ratio']:.2f})")
        if is_main_process():
            pic = reconstruction_picture(model, self.shown[0][0], self.folder.picture(done), args.mask_ratio,
                                         args.device, args.precision, title)
            self.tb.image("reconstruction", pic, done)


def link_final_checkpoint(output_dir: str, epochs: int) -> bool:
    """checkpoint-<epochs>.pth as a hard link to checkpoint-last.pth: the run's final state under its number
    without a second copy on disk (a later run continuing with more --epochs replaces checkpoint-last.pth, the
    link keeps this one). A copy where the file system has no hard links; returns whether it is a link."""
    folder = RunFolder(output_dir)
    last, final = folder.last, folder.numbered(epochs)
    linked = []

    def link(tmp: str) -> None:
        os.remove(tmp)
        try:
            os.link(last, tmp)
            linked.append(True)
        except OSError:
            shutil.copyfile(last, tmp)

    atomic_write(final, link)
    return bool(linked)


def initial_weights(args) -> str | None:
    """The recipe's record of --init: 'NAME sha256:HEX' (rank 0 hashes the file once, every rank gets it), so a
    resumed run that would switch to other initial weights is refused; None without --init."""
    if not args.init:
        return None
    if not os.path.isfile(args.init):
        raise CheckpointNotFoundError(f"--init {args.init} does not exist.")
    digest = None
    if is_main_process():
        from util.data.manifest import file_sha256

        t0 = time.time()
        digest = file_sha256(args.init)
        if time.time() - t0 > 2:
            print(f"--init {args.init}: sha256 of {os.path.getsize(args.init) / 2**30:.1f} GiB in "
                  f"{time.time() - t0:.0f}s")
    return f"{os.path.basename(args.init)} sha256:{all_gather_objects(digest)[0]}"


def start_weights(args, recipe: dict, parts: TrainParts):
    """--resume first (a restart continues its checkpoint, --init then only checked by the recipe), else the
    --init weights into the fresh model. Returns (epoch to run, progress inside it or None)."""
    path, ckpt = trainer.load_resume(args, recipe)
    if path:
        if args.init:
            print(f"--resume {args.resume} wins over --init: continuing {path}, not loading {args.init} "
                  f"(--resume none starts over from it).")
        return trainer.restore(path, ckpt, parts, f"--model {args.model} {tuple(args.input_size)}", args.epochs)
    if args.init:
        from models_build import load_mae_init

        load_mae_init(parts.model, load_checkpoint(args.init), args.init)
        if not {"blr", "lr"} & args.explicit:
            print(f"--init: this run warms up to the peak lr of a run from scratch ({args.lr:.3g}), which can undo "
                  f"part of what {os.path.basename(args.init)} learned (the demo: held-out ratio 0.46 -> 0.59 in one "
                  f"epoch); continued pretraining usually wants a quarter of it (--blr {args.blr / 4:.3g}) and "
                  f"--warmup_epochs 1 (README, Continued pretraining).")
    return 0, None


def main(args) -> None:
    if args.init and args.resume not in (None, "", "none", "auto"):
        raise UserError(f"--init {args.init} and --resume {args.resume} exclude each other: --init starts a new "
                        f"run from a model's weights, --resume continues a run with its optimizer.")
    trainer.start(args)
    args.log_dir = args.log_dir or args.output_dir
    with trainer.open_output_dir(args):
        pretrain(args)
    cleanup()


def pretrain(args) -> None:
    """Data, model, optimizer, resume, then the epochs (util.train.fit); rank 0 writes every file."""
    step_cost(args)
    preprocess = cli_args.preprocess_config(args)
    dataset, sampler, loader, shown, val = build_data(args, preprocess)
    model = build_model(args)
    groups = param_groups_weight_decay(model, args.weight_decay, model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=args.device.startswith("cuda"))
    parts = TrainParts(model, trainer.wrap_ddp(model, args), optimizer, trainer.grad_scaler(args))
    recipe = trainer.recipe_of(args, dict(data_path=os.path.abspath(args.data_path), mask_ratio=args.mask_ratio,
                                          norm_pix_loss=args.norm_pix_loss, preprocess=preprocess.to_dict(),
                                          init=initial_weights(args), table=trainer.table_fingerprint(dataset)))
    start_epoch, progress = start_weights(args, recipe, parts)
    folder = RunFolder(args.output_dir)
    if trainer.already_complete(args, start_epoch, progress, folder.pretrained):
        return
    if val is not None:
        trainer.check_readable(shown, f"--val_path {args.val_path}")
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, input {args.input_size}, "
          f"{len(dataset.paths)} volumes, effective batch {args.effective_batch}, lr {args.lr:.3g}, precision "
          f"{args.precision}, {args.world_size} process(es) x {args.num_workers} loader workers")
    print(describe_outputs(args.output_dir, args.log_dir, pictures=bool(args.vis_every),
                           demo=DEMO_DIR if args.demo else None))
    if is_main_process():  # the scans it trains on, for main_evaluate.py --pretraining (name, digest in 'args')
        from util.data.manifest import write_manifest

        args.data_manifest, args.data_manifest_sha256 = write_manifest(list(dataset.paths), args.output_dir)
        write_text(folder.args, json.dumps(args_record(args), indent=1))
    t_start, tb = time.time(), TBLogger(args.log_dir)
    epochs = PretrainEpochs(args, model, dataset, recipe, preprocess, tb, shown, val)
    objective = MaskedReconstruction(list(dataset.paths), args.device, args.mask_ratio)
    fit(args, parts, TrainData(dataset, sampler, loader), objective, epochs, start_epoch, progress, tb)
    if is_main_process():
        save_atomic({"model": model.state_dict(), "args": args_record(args), "preprocess": preprocess.to_dict()},
                    folder.pretrained)
        how = "a hard link to it" if link_final_checkpoint(args.output_dir, args.epochs) else "a copy"
        print(f"Done in {time.time() - t_start:.0f}s. Wrote {folder.pretrained} (weights), checkpoint-last.pth (and "
              f"checkpoint-{args.epochs}.pth, {how}), log.txt" + (", reconstruction-*.png" if args.vis_every else ""))


def cli_main(argv: list[str] | None = None):
    """Parse `argv` (default: the command line) with parse_args, run."""
    return run_main(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli_main())
