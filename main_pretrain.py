"""MAE pretraining on CT volumes. `python main_pretrain.py` runs the demo; torchrun scales it to many GPUs.

    torchrun --standalone --nproc_per_node=4 main_pretrain.py --data_path scans.csv --output_dir out/
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from util import args as cli_args
from util.errors import UserError
from util.nn.registry import ModelSpec
from util.run_folder import RunFolder
from util.train.settings import Optimization, RunOptions

if TYPE_CHECKING:  # (SimpleITK is imported after the parser: --help answers at once)
    from util.volume.preprocess import PreprocessConfig

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
    cli_args.add_channel_init_arg(g, "--init")
    g.add_argument("--mask_ratio", type=cli_args.bounded(float, min=0, max=1, min_open=True, max_open=True),
                   default=0.75, help="share of patches removed from each volume")
    g.add_argument("--norm_pix_loss", action="store_true", help="regress per-patch normalised voxels (each channel "
                                                                 "normalised on its own; needed for zscore channels)")
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


@dataclass(frozen=True)
class PretrainSettings:
    """Every setting of a pretraining run, resolved once from the flags (see `parse_args`), then only read.

    data_path/val_path: the training table and the held-out one (None: none); init: --init (continued pretraining);
    save_every/vis_every: numbered checkpoints and pictures every N epochs; demo: no --data_path was given; typed:
    the flags the user typed."""
    model: ModelSpec
    optim: Optimization
    run: RunOptions
    preprocess: PreprocessConfig
    data_path: str
    val_path: str | None
    cache_dir: str | None
    skip_bad: bool
    intensity_jitter: float
    crops_per_volume: int
    mask_ratio: float
    norm_pix_loss: bool
    init: str | None
    channel_init: str
    save_every: int
    vis_every: int
    demo: bool
    typed: frozenset

    @property
    def status_path(self) -> str:
        return RunFolder(self.run.output_dir).status


def parse_args(argv: list[str] | None = None) -> PretrainSettings:
    """Parse `argv` (default: the command line); the demo preset when no --data_path is given, else say which
    TANGERINE recipe defaults apply (only those not typed); then the flags' cross checks and the settings."""
    def presets(args) -> None:
        args.demo = args.data_path is None
        if args.demo:
            cli_args.apply_preset(args, DEMO_PRESET, "demo")
            args.data_path = os.path.join(DEMO_DIR, "pretrain.csv")  # written by the demo before the data is read
        else:
            cli_args.announce_defaults(args, "TANGERINE recipe", TANGERINE_FLAGS)

    def settings(args) -> PretrainSettings:
        if args.init and args.resume not in (None, "", "none", "auto"):
            raise UserError(f"--init {args.init} and --resume {args.resume} exclude each other: --init starts a new "
                            f"run from a model's weights, --resume continues a run with its optimizer.")
        preprocess = cli_args.preprocess_config(args)
        cli_args.check_jitter(preprocess, args.intensity_jitter)
        if not preprocess.bounded and not args.norm_pix_loss:
            raise UserError("zscore channels (--norm) have values outside [0, 1], which the MAE's Sigmoid output "
                            "cannot reconstruct; add --norm_pix_loss (targets normalised per patch and channel) or "
                            "use --norm percentile.")
        return cli_args.settings_of(
            PretrainSettings, args, model=cli_args.model_spec(args, preprocess.in_chans),
            optim=cli_args.optimization(args), run=cli_args.run_options(args, args.output_dir), preprocess=preprocess,
            typed=cli_args.typed_flags(args))
    return cli_args.parse(get_args_parser(), argv, presets, settings)


cli_args.parse_before_imports(__name__, get_args_parser)  # --help and bad values: answered before torch loads

# the heavy imports come after the parser on purpose (`--help` in a fraction of a second, not 10 s and 1 GB)
import torch  # noqa: E402

import models_mae3d  # noqa: E402, F401  (registers the MAE factories)
from datasets_three_d import Custom3DDataset  # noqa: E402
from engine_pretrain import MaskedReconstruction, PretrainEpochs  # noqa: E402
from models_build import describe_step, load_mae_init, pretrain_workload  # noqa: E402
from util.atomic import atomic_write, write_text  # noqa: E402
from util.checkpoint import CheckpointNotFoundError, save_atomic  # noqa: E402
from util.cli import run_main  # noqa: E402
from util.distributed import all_gather_objects, barrier, cleanup, is_main_process  # noqa: E402
from util.logger import TBLogger, describe_outputs  # noqa: E402
from util.nn.registry import create_model  # noqa: E402
from util.runtime import Runtime  # noqa: E402
from util.task.record import CheckpointRecord, ManifestRef, read_record  # noqa: E402
from util.train import budget, trainer  # noqa: E402
from util.train.fit import TrainData, fit  # noqa: E402
from util.train.loop import TrainParts  # noqa: E402
from util.train.lr_decay import param_groups_weight_decay  # noqa: E402
from util.train.settings import TrainSettings  # noqa: E402
from util.data.sampler import EvalShardSampler  # noqa: E402


def build_data(s: PretrainSettings, train: TrainSettings):
    """Training set, sampler and loader; the shown volume's set and a held-out loader for --val_path (None
    without it)."""
    if s.demo:
        from util.data.demo import make_demo_data

        if is_main_process():
            make_demo_data(DEMO_DIR)
        barrier()
    ds = Custom3DDataset(s.data_path, input_size=s.model.input_size, train=True, preprocess=s.preprocess,
                         cache_dir=s.cache_dir, seed=s.run.seed, skip_bad=s.skip_bad,
                         intensity_jitter=s.intensity_jitter, crops_per_volume=s.crops_per_volume)
    sampler, loader = trainer.train_loader(ds, train, s.run.num_workers, s.data_path)
    shown = Custom3DDataset(s.val_path or s.data_path, input_size=s.model.input_size, train=False,
                            preprocess=s.preprocess, cache_dir=s.cache_dir, skip_bad=s.skip_bad)
    val = None
    if s.val_path:
        val = torch.utils.data.DataLoader(shown, batch_size=train.batch_size, num_workers=0,
                                          sampler=EvalShardSampler(len(shown), train.rank, train.world_size))
    return ds, sampler, loader, shown, val


def build_model(s: PretrainSettings, device: str):
    model = create_model(s.model.name, **s.model.kwargs(), norm_pix_loss=s.norm_pix_loss)
    if s.run.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if s.run.compile:
        for blk in list(model.blocks) + list(model.decoder_blocks):
            blk.compile(dynamic=False)  # static shapes: one graph per (block, sequence length)
    return model


def step_cost(s: PretrainSettings, train: TrainSettings) -> None:
    """Say what a step costs (memory; on CPU also time) and refuse a run that cannot fit (util.train.budget)."""
    if not s.demo and "model" not in s.typed and not train.device.startswith("cuda"):
        print(f"WARNING: no --model typed, so this is the TANGERINE recipe: {s.model.name} at "
              f"{'x'.join(map(str, s.model.input_size))}, made for GPUs. For a first run on a CPU try --model "
              f"mae_vit_tiny_patch16 --input_size 64 --patch_size 8 (the demo's model).", flush=True)
    budget.check_run(pretrain_workload(s.model, s.mask_ratio), describe_step(s.model, train, s.run), "--batch_size, "
                     "--input_size or --model (a smaller one), or add --grad_checkpointing", train, s.run)


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


def initial_weights(init: str | None) -> str | None:
    """The recipe's record of --init: 'NAME sha256:HEX' (rank 0 hashes the file, or a model folder's weights, once;
    every rank gets it), so a resumed run that would switch to other initial weights is refused; None without
    --init."""
    if not init:
        return None
    if not os.path.exists(init):
        raise CheckpointNotFoundError(f"--init {init} does not exist.")
    digest = None
    if is_main_process():
        from util.model_folder import content_sha256

        t0 = time.time()
        digest = content_sha256(init)
        if time.time() - t0 > 2:
            print(f"--init {init}: sha256 in {time.time() - t0:.0f}s")
    return f"{os.path.basename(os.path.normpath(init))} sha256:{all_gather_objects(digest)[0]}"


def start_weights(s: PretrainSettings, train: TrainSettings, recipe: dict, parts: TrainParts):
    """--resume first (a restart continues its checkpoint, --init then only checked by the recipe), else the
    --init weights into the fresh model. Returns (epoch to run, progress inside it or None)."""
    path, rec = trainer.load_resume(s.run, recipe, s.preprocess)
    if path:
        if s.init:
            print(f"--resume {s.run.resume} wins over --init: continuing {path}, not loading {s.init} "
                  f"(--resume none starts over from it).")
        return trainer.restore(path, rec, parts, f"--model {s.model.name} {s.model.input_size}", s.optim.epochs)
    if s.init:
        load_mae_init(parts.model, read_record(s.init, f"--init {s.init}"), s.init, s.channel_init)
        if not {"blr", "lr"} & s.typed:
            print(f"--init: this run warms up to the peak lr of a run from scratch ({train.schedule.lr:.3g}), which "
                  f"can undo part of what {os.path.basename(os.path.normpath(s.init))} learned (the demo: held-out "
                  f"ratio 0.46 -> 0.59 in one epoch); continued pretraining usually wants a quarter of it (--blr "
                  f"{s.optim.blr / 4:.3g}) and --warmup_epochs 1 (README, Continued pretraining).")
    return 0, None


def main(s: PretrainSettings) -> None:
    rt, train = trainer.start(s.run, s.optim)
    with trainer.open_output_dir(s.run.output_dir):
        pretrain(s, rt, train)
    cleanup()


def pretrain(s: PretrainSettings, rt: Runtime, train: TrainSettings) -> None:
    """Data, model, optimizer, resume, then the epochs (util.train.fit); rank 0 writes every file."""
    step_cost(s, train)
    dataset, sampler, loader, shown, val = build_data(s, train)
    model = build_model(s, train.device)
    groups = param_groups_weight_decay(model, s.optim.weight_decay, model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=train.schedule.lr, betas=(0.9, 0.95), fused=rt.cuda)
    parts = TrainParts(model, trainer.wrap_ddp(model, rt), optimizer, trainer.grad_scaler(train))
    recipe = trainer.recipe_of(s.model, train, dict(data_path=os.path.abspath(s.data_path), mask_ratio=s.mask_ratio,
                                                    norm_pix_loss=s.norm_pix_loss, init=initial_weights(s.init),
                                                    table=trainer.table_fingerprint(dataset)))
    start_epoch, progress = start_weights(s, train, recipe, parts)
    folder = RunFolder(s.run.output_dir)
    if trainer.already_complete(s.run.output_dir, s.optim.epochs, start_epoch, progress, folder.pretrained):
        return
    if val is not None:
        trainer.check_readable(shown, f"--val_path {s.val_path}")
    print(f"{s.model.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, input "
          f"{list(s.model.input_size)}, {len(dataset.paths)} volumes, effective batch {train.effective_batch}, lr "
          f"{train.schedule.lr:.3g}, precision {train.precision}, {train.world_size} process(es) x "
          f"{s.run.num_workers} loader workers")
    print(describe_outputs(s.run.output_dir, s.run.log_dir, pictures=bool(s.vis_every),
                           demo=DEMO_DIR if s.demo else None))
    manifest = None
    if is_main_process():  # the scans it trains on, for main_evaluate.py --pretraining (name and digest recorded)
        from util.data.manifest import write_manifest

        manifest = ManifestRef(*write_manifest(list(dataset.paths), s.run.output_dir))
    flags = cli_args.flags_record(s, lr=train.schedule.lr, effective_batch=train.effective_batch,
                                  precision=train.precision, warmup_epochs=train.schedule.warmup_epochs,
                                  world_size=train.world_size)
    base = CheckpointRecord(weights={}, args=flags, recipe=recipe, preprocess=s.preprocess, data_manifest=manifest)
    if is_main_process():
        write_text(folder.args, json.dumps(base.stored_args(), indent=1))
    t_start, tb = time.time(), TBLogger(s.run.log_dir)
    epochs = PretrainEpochs(model, dataset, base, tb, shown, val, folder, train, s.mask_ratio, s.save_every,
                            s.vis_every, s.run.seed)
    objective = MaskedReconstruction(list(dataset.paths), train.device, s.mask_ratio)
    fit(s.run, train, parts, TrainData(dataset, sampler, loader, s.cache_dir), objective, epochs, start_epoch,
        progress, tb)
    if is_main_process():
        save_atomic(base.but(weights=model.state_dict(), recipe={}).to_dict(), folder.pretrained)
        how = "a hard link to it" if link_final_checkpoint(s.run.output_dir, s.optim.epochs) else "a copy"
        print(f"Done in {time.time() - t_start:.0f}s. Wrote {folder.pretrained} (weights), checkpoint-last.pth (and "
              f"checkpoint-{s.optim.epochs}.pth, {how}), log.txt" + (", reconstruction-*.png" if s.vis_every else ""))


def cli_main(argv: list[str] | None = None):
    """Parse `argv` (default: the command line) into settings, run."""
    s = parse_args(argv)
    return run_main(main, s, s.status_path)


if __name__ == "__main__":
    sys.exit(cli_main())
