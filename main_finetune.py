"""Finetune a (pretrained) 3D ViT for classification, regression or segmentation; `--eval` scores a checkpoint.

`python main_finetune.py` finetunes the demo pretraining checkpoint on the demo labels; torchrun scales it:

    torchrun --standalone --nproc_per_node=4 main_finetune.py --finetune mae_pretrained.pth \\
        --train_csv train.csv --val_csv val.csv --output_dir out/
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from util import args as cli_args
from util.errors import UserError
from util.nn.registry import ModelSpec
from util.run_folder import EVAL_METRICS, RunFolder, status_beside
from util.task.flags import FLAG_CHOICES, is_dense
from util.train.settings import Optimization, RunOptions

if TYPE_CHECKING:  # (torch and SimpleITK are imported after the parser: --help answers at once)
    from util.task.tasks import Task
    from util.volume.preprocess import PreprocessConfig

DEMO_DIR, DEMO_PRETRAIN = "demo_data", os.path.join("output_dir", "demo_pretrain")
# Demo: the MAE linear probe of the demo encoder (frozen; BatchNorm + linear head), the whole training split in
# each step. Full finetuning of a 12-block ViT on 16 volumes collapses to a constant classifier; the probe shows
# what the pretrained features hold, and `--finetune none` the same probe on random features (README).
DEMO_PRESET = dict(model="vit_tiny_patch16", input_size=[64, 64, 64], patch_size=[8, 8, 8], linprobe=True,
                   epochs=30, warmup_epochs=1, batch_size=16, blr=3.0, weight_decay=0.0, drop_path=0.0,
                   smoothing=0.0, finetune="demo", train_csv=os.path.join(DEMO_DIR, "train.csv"),
                   val_csv=os.path.join(DEMO_DIR, "val.csv"), output_dir=os.path.join("output_dir", "demo_finetune"),
                   num_workers=min(2, cli_args.default_num_workers()), print_freq=5)
LINPROBE_PRESET = dict(blr=0.1, weight_decay=0.0, drop_path=0.0, smoothing=0.0)  # MAE linear-probe recipe
EXAMPLES = """  python main_finetune.py                       # demo: finetunes the demo MAE (run main_pretrain.py first)
  torchrun --standalone --nproc_per_node=4 main_finetune.py --finetune mae_pretrained.pth \\
      --train_csv train.csv --val_csv val.csv --test_csv test.csv --model vit_large_patch16 --pool cat
  python main_finetune.py --task segmentation --train_csv seg.csv --val_csv seg_val.csv --spacing 2 1.5 1.5 \\
      --input_size 96 --crops_per_volume 4 --finetune mae_pretrained.pth
  python main_finetune.py --eval --resume out/checkpoint-best.pth --val_csv test.csv
  python main_finetune.py --train_csv nodules.csv --roi_mm 50 50 50 --input_size 64 --finetune mae_pretrained.pth
"""


def get_args_parser():
    p = cli_args.make_parser("main_finetune.py", "3D ViT finetuning, linear probing and evaluation.", EXAMPLES)
    g = p.add_argument_group("data and task")
    g.add_argument("--train_csv", default=None, help="CSV with Path and label columns (omit all CSVs for the demo)")
    g.add_argument("--val_csv", default=None, help="scored every epoch; picks checkpoint-best.pth")
    g.add_argument("--test_csv", default=None, help="scored once with the best checkpoint after training")
    g.add_argument("--task", default="classification", choices=FLAG_CHOICES,
                   help="segmentation reads label maps from a Mask column")
    g.add_argument("--label_columns", nargs="+", default=None, help="label column(s) (default Label); several = "
                                                                     "multi-label")
    g.add_argument("--nb_classes", type=cli_args.bounded(int, min=2), default=None,
                   help="default: from the training labels / masks")
    g.add_argument("--regression", action="store_true", help="MSE on the label column(s) instead of classes")
    g.add_argument("--pos_weight", type=cli_args.pos_weight, nargs="+", default=None,
                   help="BCE positive weight(s), or 'auto' (neg/pos)")
    g.add_argument("--class_weights", default="none", choices=["auto", "none"], help="multiclass CE class weights")
    g.add_argument("--smoothing", type=cli_args.bounded(float, min=0, max=1, max_open=True), default=0.1,
                   help="label smoothing (multiclass)")
    g.add_argument("--fg_prob", type=cli_args.bounded(float, min=0, max=1), default=0.5,
                   help="segmentation: share of crops centred on foreground")
    g.add_argument("--intensity_jitter", type=cli_args.bounded(float, min=0, max=1, max_open=True), default=0.0,
                   help="random intensity scale/shift (training)")
    g = p.add_argument_group("head and initialisation")
    g.add_argument("--pool", default="avg", choices=["avg", "token", "cat"], help="TANGERINE classifiers used cat")
    g.add_argument("--feature_size", type=cli_args.bounded(int, min=1), default=16,
                   help="UNETR decoder width (segmentation)")
    g.add_argument("--drop_path", type=cli_args.bounded(float, min=0, max=1, max_open=True), default=0.1,
                   help="stochastic depth rate of the last block")
    g.add_argument("--layer_decay", type=cli_args.bounded(float, min=0, max=1, min_open=True), default=0.75,
                   help="layer-wise lr decay from the head to the input (1: none)")
    g.add_argument("--finetune", default=None, help="pretrained checkpoint (ours or TANGERINE) (default: none, the "
                                                     "encoder starts from random weights; the demo: the demo MAE)")
    cli_args.add_channel_init_arg(g, "--finetune")
    g.add_argument("--linprobe", action=argparse.BooleanOptionalAction, default=False,
                   help="freeze the encoder; BatchNorm + linear head, LARS (--no-linprobe: full finetune)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="only evaluate a finetuned checkpoint on --val_csv")
    g.add_argument("--metrics_json", default=None, help="--eval output (default OUTPUT_DIR/eval_metrics.json)")
    g.add_argument("--best_metric", default=None, help="default auroc (classification), mae (regression), dice")
    g.add_argument("--sw_batch_size", type=cli_args.bounded(int, min=1), default=2,
                   help="sliding-window batch (segmentation eval)")
    g.add_argument("--sw_overlap", type=cli_args.bounded(float, min=0, max=1, max_open=True), default=0.5,
                   help="sliding-window overlap (segmentation eval)")
    cli_args.add_training_args(p, cli_args.VIT_MODELS, "vit_large_patch16", blr=1e-3, epochs=50,
                               warmup_epochs=5, min_lr=1e-6, output_dir=None,
                               output_note=" (default: output_dir/finetune; --eval: next to the checkpoint)")
    cli_args.add_preprocess_args(p)
    cli_args.add_roi_args(p)
    return p


@dataclass(frozen=True)
class FinetuneSettings:
    """Every setting of a finetuning (or --eval) run, resolved once from the flags (`parse_args`), then only read
    (`adopt` makes new ones with the --finetune encoder's sizes and preprocessing). task: the flags' Task (its
    classes come from the labels); finetune: the pretrained file or folder (None: random weights); checkpoint:
    --eval's file; best_metric: None for the task's default; typed: the flags the user typed."""
    model: ModelSpec
    optim: Optimization
    run: RunOptions
    preprocess: PreprocessConfig
    task: Task
    train_csv: str | None
    val_csv: str | None
    test_csv: str | None
    label_columns: tuple[str, ...] | None
    nb_classes: int | None
    pos_weight: tuple[str, ...] | None
    class_weights: str
    smoothing: float
    fg_prob: float
    intensity_jitter: float
    cache_dir: str | None
    crops_per_volume: int
    pool: str
    feature_size: int
    drop_path: float
    layer_decay: float
    finetune: str | None
    channel_init: str
    linprobe: bool
    eval: bool
    checkpoint: str | None
    metrics_json: str | None
    best_metric: str | None
    sw_batch_size: int
    sw_overlap: float
    demo: bool
    typed: frozenset

    @property
    def status_path(self) -> str:
        """exit_status.json of the run folder; --eval: beside its metrics file (never the training run's)."""
        return status_beside(self.eval_output) if self.eval else RunFolder(self.run.output_dir).status

    @property
    def eval_output(self) -> str:
        """--eval's metrics file: --metrics_json, else eval_metrics.json in --output_dir or beside the checkpoint."""
        folder = self.run.output_dir if "output_dir" in self.typed else os.path.dirname(os.path.abspath(
            self.checkpoint or "."))
        return self.metrics_json or os.path.join(folder, EVAL_METRICS)


def parse_args(argv: list[str] | None = None) -> FinetuneSettings:
    """Parse `argv` (default: the command line); the demo preset (no CSV given) and the linear-probe recipe for
    the flags not typed; say when the encoder starts from random weights; then the flags' cross checks and the
    settings."""
    def presets(args) -> None:
        args.demo = not (args.train_csv or args.val_csv or args.test_csv)
        if args.demo:
            cli_args.apply_preset(args, DEMO_PRESET, "demo")
        if args.linprobe:  # the recipe's values, except where the demo preset sets its own
            recipe = {k: v for k, v in LINPROBE_PRESET.items() if not (args.demo and k in DEMO_PRESET)}
            cli_args.apply_preset(args, recipe, "linear-probe recipe")
        if not args.eval and args.finetune in (None, "", "none"):
            typed = "--finetune none" if "finetune" in args.explicit else "no --finetune"
            cli_args.announce(f"{typed}: the encoder starts from random weights.")
        args.output_dir = args.output_dir or os.path.join("output_dir", "finetune")

    def settings(args) -> FinetuneSettings:
        from util.task.tasks import from_flags

        if is_dense(args.task) and (args.linprobe or args.regression):
            raise UserError("--task segmentation cannot be combined with --linprobe or --regression.")
        if not args.eval and not args.train_csv:
            raise UserError("Training needs --train_csv (and usually --val_csv); or pass --eval to score a "
                            "checkpoint.")
        finetune = None if args.finetune in (None, "none", "") else args.finetune
        if finetune == "demo":
            finetune = None if args.eval else demo_checkpoint()
        preprocess = cli_args.preprocess_config(args)
        cli_args.check_jitter(preprocess, args.intensity_jitter)
        return cli_args.settings_of(
            FinetuneSettings, args, finetune=finetune, model=cli_args.model_spec(args, preprocess.in_chans),
            optim=cli_args.optimization(args), run=cli_args.run_options(args, args.output_dir), preprocess=preprocess,
            task=from_flags(args.task, args.regression, len(args.label_columns or ["Label"])),
            checkpoint=eval_checkpoint(args) if args.eval else None, typed=cli_args.typed_flags(args))
    return cli_args.parse(get_args_parser(), argv, presets, settings)


def demo_checkpoint() -> str:
    """The demo pretraining weights made by `python main_pretrain.py`, or a one-sentence refusal saying so."""
    folder = RunFolder(DEMO_PRETRAIN)
    for path in (folder.pretrained, folder.last):
        if os.path.isfile(path):
            return path
    raise UserError(f"No demo pretraining checkpoint in {DEMO_PRETRAIN}/ (mae_pretrained.pth or checkpoint-last.pth): "
                    f"run `python main_pretrain.py` first to make it, or pass --finetune none to train from scratch.")


def eval_checkpoint(args) -> str:
    """--eval's checkpoint: --resume PATH (or --finetune), else the best (or last) of --output_dir."""
    path = next((p for p in (args.resume, args.finetune) if p not in (None, "", "auto", "none", "demo")), None)
    path = path or RunFolder(args.output_dir).best_or_last()
    if path is None:
        raise UserError(f"--eval needs a finetuned checkpoint: pass --resume PATH (none found in {args.output_dir}).")
    if not args.val_csv:
        raise UserError("--eval needs --val_csv (a CSV with Path and label columns).")
    return path


cli_args.parse_before_imports(__name__, get_args_parser)  # --help and bad values: answered before torch loads

# the heavy imports come after the parser on purpose (`--help` in a fraction of a second, not 10 s and 1 GB)
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402

from datasets_three_d_fine import Custom3DDataset  # noqa: E402
from engine_finetune import EvalSettings, FinetuneEpochs, Supervised, build_optimizer, evaluate  # noqa: E402
from models_build import (adopt_encoder, describe_step, finetune_model, finetune_workload,  # noqa: E402
                          model_from_record, training_meta)
from util.atomic import ensure_writable_dir, write_text  # noqa: E402
from util.cli import run_main  # noqa: E402
from util.distributed import barrier, cleanup, is_main_process  # noqa: E402
from util.logger import TBLogger, describe_outputs  # noqa: E402
from util.run_folder import TEST_METRICS  # noqa: E402
from util.runtime import Runtime  # noqa: E402
from util.task.record import CheckpointRecord, read_record, require  # noqa: E402
from util.train import budget, trainer  # noqa: E402
from util.train.fit import TrainData, fit  # noqa: E402
from util.train.loop import TrainParts  # noqa: E402
from util.train.settings import TrainSettings  # noqa: E402
from util.data.sampler import EvalShardSampler  # noqa: E402


def make_dataset(csv_path: str, train: bool, s: FinetuneSettings, task: Task, nb_classes: int | None = None):
    """Training set (random crops, flips) or eval set (centre crop; whole volumes for label maps)."""
    return Custom3DDataset(csv_path, input_size=s.model.input_size, train=train, preprocess=s.preprocess, task=task,
                           label_columns=list(s.label_columns) if s.label_columns is not None else None,
                           cache_dir=s.cache_dir, seed=s.run.seed, fg_prob=s.fg_prob,
                           intensity_jitter=s.intensity_jitter if train else 0.0,
                           nb_classes=nb_classes or s.nb_classes,
                           whole_volume=not train and task.dense,  # for sliding windows
                           crops_per_volume=s.crops_per_volume if train else 1)


def make_eval_loader(ds, s: FinetuneSettings, train: TrainSettings):
    return torch.utils.data.DataLoader(ds, batch_size=1 if ds.task_type.dense else train.batch_size,
                                       sampler=EvalShardSampler(len(ds), train.rank, train.world_size),
                                       num_workers=s.run.num_workers, pin_memory=train.device.startswith("cuda"),
                                       worker_init_fn=trainer.worker_init if s.run.num_workers else None)


def adopt(s: FinetuneSettings, init: CheckpointRecord | None) -> FinetuneSettings:
    """The settings with the --finetune encoder's size, patch, input size and preprocessing where not typed."""
    if init is None:
        return s
    model, preprocess = adopt_encoder(init, s.model, s.preprocess, s.typed, s.finetune)
    return replace(s, model=model, preprocess=preprocess)


def train(s: FinetuneSettings, rt: Runtime, train_s: TrainSettings, init: CheckpointRecord | None) -> str | None:
    """Data, model, optimizer, resume, then the epochs (util.train.fit); returns the best metric, or None when the
    folder already held every epoch."""
    train_ds = make_dataset(s.train_csv, True, s, s.task)
    sampler, loader = trainer.train_loader(train_ds, train_s, s.run.num_workers, s.train_csv)
    k = None if (s.task.continuous or s.task.multi_label) else train_ds.nb_classes  # same classes everywhere
    val_loader, test_loader = (make_eval_loader(make_dataset(p, False, s, s.task, k), s, train_s) if p
                               else None for p in (s.val_csv, s.test_csv))
    nb_classes = s.nb_classes or int(train_ds.nb_classes)
    columns = list(s.label_columns or ["Label"])
    meta = training_meta(s.task.resolve(nb_classes), s.model, train_ds.label_names, columns, nb_classes, s.pool,
                         s.feature_size, s.linprobe)
    task = meta.task
    best_metric = s.best_metric or task.best_metric
    weights = task.loss_weights(train_ds.targets, train_ds.class_counts,
                                list(s.pos_weight) if s.pos_weight else None, s.class_weights)
    criterion = task.criterion(s.smoothing, weights, rt.device)
    model = finetune_model(meta, init, s.finetune, drop_path=s.drop_path, linprobe=s.linprobe,
                           grad_checkpointing=s.run.grad_checkpointing, compile=s.run.compile, device=rt.device,
                           channel_init=s.channel_init)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shown = f"{n_train / 1e6:.2f}M" if n_train >= 10 ** 5 else str(n_train)  # a linear probe: a few hundred
    print(f"{s.model.name} ({task.name}, {meta.nb_outputs} outputs, {shown} trainable): input "
          f"{list(s.model.input_size)}, {len(train_ds.paths)} training volumes, effective batch "
          f"{train_s.effective_batch}, lr {train_s.schedule.lr:.3g}, precision {train_s.precision}")
    optimizer = build_optimizer(model, train_s, s.optim.weight_decay, s.layer_decay, s.linprobe)
    parts = TrainParts(model, trainer.wrap_ddp(model, rt), optimizer, trainer.grad_scaler(train_s))
    recipe = trainer.recipe_of(s.model, train_s, dict(train_csv=os.path.abspath(s.train_csv), mode=task.name,
                                                      nb_outputs=meta.nb_outputs, global_pool=s.pool,
                                                      linprobe=s.linprobe, finetune=s.finetune,
                                                      table=trainer.table_fingerprint(train_ds)))
    path, rec = trainer.load_resume(s.run, recipe, s.preprocess)
    start_epoch, progress = trainer.restore(path, rec, parts, f"this {s.model.name} {task.name} model",
                                            s.optim.epochs) if path else (0, None)
    if trainer.already_complete(s.run.output_dir, s.optim.epochs, start_epoch, progress):
        return None
    for flag, csv, ld in (("--val_csv", s.val_csv, val_loader), ("--test_csv", s.test_csv, test_loader)):
        if ld is not None:
            trainer.check_readable(ld.dataset, f"{flag} {csv}")
    eval_settings = EvalSettings(train_s.device, train_s.precision, s.sw_batch_size, s.sw_overlap)
    flags = cli_args.flags_record(s, lr=train_s.schedule.lr, effective_batch=train_s.effective_batch,
                                  precision=train_s.precision, warmup_epochs=train_s.schedule.warmup_epochs,
                                  world_size=train_s.world_size, best_metric=best_metric)
    base = CheckpointRecord(weights={}, args=flags, recipe=recipe, preprocess=s.preprocess, meta=meta,
                            loss_weights=weights, best=rec.best if rec else None, smoothing=s.smoothing)
    epochs = FinetuneEpochs(model, criterion, val_loader, eval_settings, meta, base, best_metric, s.optim.epochs,
                            RunFolder(s.run.output_dir).best)
    if val_loader is None:
        print("No --val_csv: nothing is validated, so there is no best epoch and no checkpoint-best.pth; "
              + ("--test_csv is scored with checkpoint-last.pth." if test_loader is not None else
                 "checkpoint-last.pth holds the last epoch."))
    fit(s.run, train_s, parts, TrainData(train_ds, sampler, loader, s.cache_dir),
        Supervised(criterion, task, rt.device), epochs, start_epoch, progress, TBLogger(s.run.log_dir))
    if test_loader is not None:
        score_test(s, model, criterion, test_loader, meta, eval_settings)
    return best_metric


def score_test(s: FinetuneSettings, model, criterion, loader, meta, eval_settings) -> None:
    """Score --test_csv once with the best checkpoint (the last one when there is no validation set)."""
    path = RunFolder(s.run.output_dir).best_or_last()
    model.load_state_dict(read_record(path).weights)
    metrics = evaluate(model, criterion, loader, eval_settings, meta)
    print(f"Test ({s.test_csv}, {os.path.basename(path)}): {json.dumps(metrics)}")
    write_metrics(RunFolder(s.run.output_dir).file(TEST_METRICS), path, s.test_csv, metrics)


def run_eval(s: FinetuneSettings, train_s: TrainSettings) -> dict:
    """Score a finetuned checkpoint on --val_csv with the model, preprocessing and loss saved in it."""
    rec = require(read_record(s.checkpoint), "--eval", meta=True)
    meta = rec.meta
    s = replace(s, model=ModelSpec(meta.model, meta.input_size, meta.patch_size, meta.in_chans),
                preprocess=rec.preprocess, label_columns=s.label_columns or meta.label_columns or None)
    k = None if (meta.task.continuous or meta.task.multi_label) else meta.nb_classes
    loader = make_eval_loader(make_dataset(s.val_csv, False, s, meta.task, k), s, train_s)
    metrics = evaluate(model_from_record(rec, meta).to(train_s.device),
                       meta.task.criterion(rec.smoothing, rec.loss_weights, train_s.device), loader,
                       EvalSettings(train_s.device, train_s.precision, s.sw_batch_size, s.sw_overlap), meta)
    print(f"Eval of {s.checkpoint} on {s.val_csv}: {json.dumps(metrics)}")
    write_metrics(s.eval_output, s.checkpoint, s.val_csv, metrics, "--metrics_json folder")
    print(f"Metrics written to {s.eval_output}")
    return metrics


def write_metrics(path: str, checkpoint: str, csv: str, metrics: dict, folder_flag: str | None = None) -> None:
    """Rank 0: {'checkpoint', 'csv', metric...} as JSON (the folder checked first when a flag chose it)."""
    if is_main_process():
        if folder_flag:
            ensure_writable_dir(os.path.dirname(os.path.abspath(path)), folder_flag)
        write_text(path, json.dumps({"checkpoint": checkpoint, "csv": csv, **metrics}, indent=1))


def main(s: FinetuneSettings) -> None:
    rt, train_s = trainer.start(s.run, s.optim, epoch_line=True)  # one line per epoch: no progress line for its end
    if s.demo:
        if is_main_process():
            from util.data.demo import make_demo_data

            make_demo_data(DEMO_DIR)
        barrier()
    if s.eval:
        run_eval(s, train_s)
        return cleanup()
    init = read_record(s.finetune, f"--finetune {s.finetune}") if s.finetune else None  # read once
    s = adopt(s, init)
    budget.check_run(finetune_workload(s.model, s.task.dense, s.linprobe, s.feature_size),
                     describe_step(s.model, train_s, s.run, ", linear probe" if s.linprobe else ""),
                     "--batch_size, --input_size or --model (a smaller one), or add --grad_checkpointing",
                     train_s, s.run)
    print(describe_outputs(s.run.output_dir, s.run.log_dir, demo=DEMO_DIR if s.demo else None))
    t0 = time.time()
    with trainer.open_output_dir(s.run.output_dir):
        best_metric = train(s, rt, train_s, init)
    if best_metric is not None:
        best = f"checkpoint-best.pth (best {best_metric}), " if s.val_csv else ""
        print(f"Done in {time.time() - t0:.0f}s. Wrote {best}checkpoint-last.pth and log.txt in {s.run.output_dir}")
    cleanup()


def cli_main(argv: list[str] | None = None):
    """Parse `argv` (default: the command line) into settings, run."""
    s = parse_args(argv)
    return run_main(main, s, s.status_path)


if __name__ == "__main__":
    sys.exit(cli_main())
