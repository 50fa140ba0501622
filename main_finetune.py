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

from util import args as cli_args
from util.task.flags import FLAG_CHOICES

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


def parse_args(argv: list[str] | None = None):
    """Parse `argv` (default: the command line); the demo preset (no CSV given) and the linear-probe recipe for
    the flags not typed; say when the encoder starts from random weights; then the flags' cross checks."""
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
    return cli_args.parse(get_args_parser(), argv, presets)


cli_args.parse_before_imports(__name__, get_args_parser)  # --help and bad values: answered before torch loads

# the heavy imports come after the parser on purpose (`--help` in a fraction of a second, not 10 s and 1 GB)
import torch  # noqa: E402

import models_vit3d  # noqa: E402
from datasets_three_d_fine import Custom3DDataset  # noqa: E402
from engine_finetune import EvalSettings, Supervised, build_optimizer, evaluate  # noqa: E402
from models_build import (adopt_encoder_sizes, build_model_from_meta, finetune_workload,  # noqa: E402
                          model_from_checkpoint, training_meta)
from util.train import budget, trainer  # noqa: E402
from util.atomic import ensure_writable_dir, write_text  # noqa: E402
from util.checkpoint import best_or_last, load_checkpoint, plain, state_dict_of  # noqa: E402
from util.distributed import barrier, cleanup, is_main_process  # noqa: E402
from util.errors import UserError, run_main  # noqa: E402
from util.logger import TBLogger, describe_outputs  # noqa: E402
from util.run_folder import EVAL_METRICS, TEST_METRICS, RunFolder  # noqa: E402
from util.train.fit import TrainData, fit  # noqa: E402
from util.train.loop import TrainParts  # noqa: E402
from util.task.metrics import summary_line  # noqa: E402
from util.volume.preprocess import PreprocessConfig  # noqa: E402
from util.data.sampler import EvalShardSampler  # noqa: E402
from util.task.meta import RunMeta  # noqa: E402
from util.task.tasks import Task, from_flags  # noqa: E402
from util.triple import check_sizes  # noqa: E402


def resolve_demo_checkpoint() -> str:
    """The demo pretraining weights made by `python main_pretrain.py`, or a one-sentence exit saying so."""
    folder = RunFolder(DEMO_PRETRAIN)
    for path in (folder.pretrained, folder.last):
        if os.path.isfile(path):
            return path
    raise UserError(f"No demo pretraining checkpoint in {DEMO_PRETRAIN}/ (mae_pretrained.pth or checkpoint-last.pth): "
                    f"run `python main_pretrain.py` first to make it, or pass --finetune none to train from scratch.")


def make_dataset(csv_path: str, train: bool, args, preprocess, task: Task | None = None,
                 nb_classes: int | None = None):
    """Training set (random crops, flips) or eval set (centre crop; whole volumes for label maps); the task of
    the flags unless given."""
    task = task or from_flags(args.task, args.regression, len(args.label_columns or ["Label"]))
    return Custom3DDataset(csv_path, input_size=args.input_size, train=train, preprocess=preprocess, task=task,
                           label_columns=args.label_columns, cache_dir=args.cache_dir,
                           seed=args.seed, fg_prob=args.fg_prob, intensity_jitter=args.intensity_jitter if train
                           else 0.0, nb_classes=nb_classes or args.nb_classes,
                           whole_volume=not train and task.dense,  # for sliding windows
                           crops_per_volume=args.crops_per_volume if train else 1)


def make_eval_loader(ds, args):
    return torch.utils.data.DataLoader(ds, batch_size=1 if ds.task_type.dense else args.batch_size,
                                       sampler=EvalShardSampler(len(ds), args.rank, args.world_size),
                                       num_workers=args.num_workers, pin_memory=args.device.startswith("cuda"),
                                       worker_init_fn=trainer.worker_init if args.num_workers else None)


def build_model(args, meta: RunMeta):
    """Model for `meta`, encoder loaded from --finetune, head initialised, encoder frozen for --linprobe."""
    meta = RunMeta.from_dict(meta)
    model = build_model_from_meta(meta, drop_path=args.drop_path)
    vit = models_vit3d.backbone(model)
    if args.finetune:
        load_finetune(vit, args)
    if not meta.task.dense:  # UNETR's output convolution keeps its own initialisation
        head = model.head[-1] if args.linprobe else model.head
        torch.nn.init.trunc_normal_(head.weight, std=0.01 if args.linprobe else 2e-5)
        torch.nn.init.zeros_(head.bias)
    if args.linprobe:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
    if args.grad_checkpointing:
        vit.set_grad_checkpointing(True)
    model.to(args.device)
    if args.compile:  # blocks differ in drop-path rate (and train/eval), so each compiles its own graphs
        dyn = torch._dynamo.config
        name = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
        setattr(dyn, name, max(getattr(dyn, name), 4 * len(vit.blocks)))
        for blk in vit.blocks:
            blk.compile(dynamic=False)  # static shapes: one graph per (block, sequence length)
    return model


def load_finetune(vit, args) -> None:
    """Load a pretrained encoder (our MAE, TANGERINE, or a finetuned ViT) into `vit`."""
    try:
        ckpt = load_checkpoint(args.finetune)
        info = models_vit3d.load_pretrained_encoder(vit, ckpt, verbose=True)
    except ValueError as e:
        msg = str(e)
        raise UserError(msg if args.finetune in msg else f"--finetune {args.finetune}: {msg}") from None
    if not info["loaded"]:
        raise UserError(f"--finetune {args.finetune} holds no weights of the {args.model} encoder.")
    pre = ckpt.get("preprocess") or {}
    for key in ("window", "orientation"):
        if key in pre and plain(pre[key]) != plain(getattr(args, key)):
            print(f"WARNING: {args.finetune} was pretrained with --{key} {pre[key]}; this run uses "
                  f"{plain(getattr(args, key))}.")
    print(f"Loaded {len(info['loaded'])} tensors from {args.finetune}.")


class FinetuneEpochs:
    """Finetuning's part of the epoch skeleton (util.train.fit): score --val_csv after each epoch, keep the best
    record (checkpoint-best.pth when it improves; without validation there is no best), print one line with the
    training loss, the validation loss and the task's metrics. Every checkpoint holds the recipe, the RunMeta, the
    preprocessing, the loss weights, the best record and the last metrics."""
    prints_epoch_line = True  # the epoch's line covers its last step: no progress line for it (util.train.loop)

    def __init__(self, args, model, criterion, val_loader, eval_settings, meta: RunMeta, fields: dict, best: dict):
        self.args, self.model, self.criterion, self.val_loader = args, model, criterion, val_loader
        self.eval_settings, self.meta, self.fields, self.best, self.metrics = eval_settings, meta, fields, best, {}

    def checkpoint_fields(self) -> dict:
        return dict(self.fields, best=self.best, metrics=self.metrics)

    def end_epoch(self, epoch: int, stats: dict) -> tuple[dict, list[str]]:
        args = self.args
        metrics = evaluate(self.model, self.criterion, self.val_loader, self.eval_settings, self.meta) \
            if self.val_loader else {}
        if metrics and args.best_metric not in metrics:
            raise UserError(f"--best_metric {args.best_metric} is not computed here; choose one of {sorted(metrics)}.")
        improved = bool(metrics) and self.meta.task.is_better(metrics[args.best_metric], self.best.get("value"),
                                                              args.best_metric)
        if improved:
            self.best = {"metric": args.best_metric, "value": metrics[args.best_metric], "epoch": epoch}
        self.metrics = metrics
        line = f"epoch {epoch + 1}/{args.epochs}: train loss {stats['loss']:.4f}"
        if metrics:  # best['epoch'] counts from 0, as the checkpoint's 'epoch'
            line += (f"; val {summary_line(metrics, (args.best_metric,))} (best {args.best_metric} "
                     f"{self.best.get('value', float('nan')):.4f} at epoch {self.best.get('epoch', 0) + 1})")
        print(line, flush=True)
        stats = {**{f"train_{k}": v for k, v in stats.items()}, **{f"val_{k}": v for k, v in metrics.items()},
                 "epoch": epoch + 1}  # log.txt counts epochs from 1, like the console
        return stats, [RunFolder(args.output_dir).best] if improved else []


def train(args, preprocess) -> None:
    task = from_flags(args.task, args.regression, len(args.label_columns or ["Label"]))
    train_ds = make_dataset(args.train_csv, True, args, preprocess, task)
    sampler, loader = trainer.train_loader(train_ds, args, args.train_csv)
    k = None if (task.continuous or task.multi_label) else train_ds.nb_classes  # same classes everywhere
    val_loader, test_loader = (make_eval_loader(make_dataset(p, False, args, preprocess, task, k), args) if p
                               else None for p in (args.val_csv, args.test_csv))
    nb_classes = args.nb_classes or int(train_ds.nb_classes)
    meta = training_meta(task.resolve(nb_classes), args, train_ds.label_names, nb_classes)
    task = meta.task
    args.best_metric = args.best_metric or task.best_metric
    weights = task.loss_weights(train_ds.targets, train_ds.class_counts, args.pos_weight, args.class_weights)
    criterion = task.criterion(args.smoothing, weights, args.device)
    model = build_model(args, meta)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shown = f"{n_train / 1e6:.2f}M" if n_train >= 10 ** 5 else str(n_train)  # a linear probe: a few hundred
    print(f"{args.model} ({task.name}, {meta.nb_outputs} outputs, {shown} trainable): input "
          f"{args.input_size}, {len(train_ds.paths)} training volumes, effective batch {args.effective_batch}, "
          f"lr {args.lr:.3g}, precision {args.precision}")
    optimizer = build_optimizer(model, trainer.settings(args), args.weight_decay, args.layer_decay, args.linprobe)
    parts = TrainParts(model, trainer.wrap_ddp(model, args), optimizer, trainer.grad_scaler(args))
    recipe = trainer.recipe_of(args, dict(train_csv=os.path.abspath(args.train_csv), mode=task.name,
                                          nb_outputs=meta.nb_outputs, global_pool=args.pool, linprobe=args.linprobe,
                                          finetune=args.finetune, preprocess=preprocess.to_dict(),
                                          table=trainer.table_fingerprint(train_ds)))
    path, ckpt = trainer.load_resume(args, recipe)
    start_epoch, progress = trainer.restore(path, ckpt, parts, f"this {args.model} {task.name} model",
                                            args.epochs) if path else (0, None)
    if trainer.already_complete(args, start_epoch, progress):
        args.already_complete = True
        return
    for flag, csv, ld in (("--val_csv", args.val_csv, val_loader), ("--test_csv", args.test_csv, test_loader)):
        if ld is not None:
            trainer.check_readable(ld.dataset, f"{flag} {csv}")
    eval_settings = EvalSettings(args.device, args.precision, args.sw_batch_size, args.sw_overlap)
    fields = dict(recipe=recipe, meta=meta.to_dict(), preprocess=preprocess.to_dict(), loss_weights=weights)
    epochs = FinetuneEpochs(args, model, criterion, val_loader, eval_settings, meta, fields, ckpt.get("best") or {})
    if val_loader is None:
        print("No --val_csv: nothing is validated, so there is no best epoch and no checkpoint-best.pth; "
              + ("--test_csv is scored with checkpoint-last.pth." if test_loader is not None else
                 "checkpoint-last.pth holds the last epoch."))
    fit(args, parts, TrainData(train_ds, sampler, loader), Supervised(criterion, task, args.device), epochs,
        start_epoch, progress, TBLogger(args.log_dir))
    if test_loader is not None:
        score_test(args, model, criterion, test_loader, meta, eval_settings)


def score_test(args, model, criterion, loader, meta, eval_settings) -> None:
    """Score --test_csv once with the best checkpoint (the last one when there is no validation set)."""
    path = best_or_last(args.output_dir)
    model.load_state_dict(state_dict_of(load_checkpoint(path)))
    metrics = evaluate(model, criterion, loader, eval_settings, meta)
    print(f"Test ({args.test_csv}, {os.path.basename(path)}): {json.dumps(metrics)}")
    if is_main_process():
        write_text(RunFolder(args.output_dir).file(TEST_METRICS),
                   json.dumps({"checkpoint": path, "csv": args.test_csv, **metrics}, indent=1))


def run_eval(args) -> dict:
    """Score a finetuned checkpoint on --val_csv with the preprocessing and model saved in it."""
    path = next((p for p in (args.resume, args.finetune) if p not in (None, "", "auto", "none", "demo")), None)
    folder = args.output_dir or os.path.join("output_dir", "finetune")
    path = path or best_or_last(folder)
    if path is None:
        raise UserError(f"--eval needs a finetuned checkpoint: pass --resume PATH (none found in {folder}).")
    ckpt = load_checkpoint(path)
    saved = ckpt.get("args") or {}
    if ckpt.get("meta") is None:
        raise UserError(f"{path} is not a finetuned checkpoint (it has no 'meta'); --eval scores the checkpoints "
                        f"written by main_finetune.py.")
    meta = RunMeta.from_dict(ckpt["meta"], path)
    if not args.val_csv:
        raise UserError("--eval needs --val_csv (a CSV with Path and label columns).")
    model = model_from_checkpoint(ckpt, meta).to(args.device)
    preprocess = PreprocessConfig.from_dict(ckpt["preprocess"])
    args.input_size, args.label_columns = meta.input_size, args.label_columns or list(meta.label_columns) or None
    k = None if (meta.task.continuous or meta.task.multi_label) else meta.nb_classes
    loader = make_eval_loader(make_dataset(args.val_csv, False, args, preprocess, meta.task, k), args)
    criterion = meta.task.criterion(saved.get("smoothing", 0.0), ckpt.get("loss_weights"), args.device)
    metrics = evaluate(model, criterion, loader, EvalSettings(args.device, args.precision, args.sw_batch_size,
                                                               args.sw_overlap), meta)
    out = args.metrics_json or os.path.join(args.output_dir or os.path.dirname(os.path.abspath(path)),
                                            EVAL_METRICS)
    print(f"Eval of {path} on {args.val_csv}: {json.dumps(metrics)}")
    if is_main_process():
        ensure_writable_dir(os.path.dirname(os.path.abspath(out)), "--metrics_json folder")
        write_text(out, json.dumps({"checkpoint": path, "csv": args.val_csv, **metrics}, indent=1))
    print(f"Metrics written to {out}")
    return metrics


def main(args) -> None:
    trainer.start(args)
    if args.demo:
        if is_main_process():
            from util.data.demo import make_demo_data

            make_demo_data(DEMO_DIR)
        barrier()
    if args.finetune == "demo":
        args.finetune = None if args.eval else resolve_demo_checkpoint()
    args.finetune = None if args.finetune in ("none", "") else args.finetune
    if args.eval:
        run_eval(args)
        return cleanup()
    if from_flags(args.task).dense and (args.linprobe or args.regression):
        raise UserError("--task segmentation cannot be combined with --linprobe or --regression.")
    if not args.train_csv:
        raise UserError("Training needs --train_csv (and usually --val_csv); or pass --eval to score a checkpoint.")
    if args.finetune:  # the encoder's size and patch from its weights, unless typed (models_build)
        adopt_encoder_sizes(args)
        check_sizes(args)
    work, what = finetune_workload(args, from_flags(args.task).dense)  # the step's cost, refused if it cannot fit
    budget.check_run(args, work, what, "--batch_size, --input_size or --model (a smaller one), or add "
                                       "--grad_checkpointing")
    args.output_dir = args.output_dir or os.path.join("output_dir", "finetune")
    args.log_dir = args.log_dir or args.output_dir
    print(describe_outputs(args.output_dir, args.log_dir, demo=DEMO_DIR if args.demo else None))
    t0 = time.time()
    with trainer.open_output_dir(args):
        train(args, cli_args.preprocess_config(args))
    if getattr(args, "already_complete", False):
        return cleanup()
    best = f"checkpoint-best.pth (best {args.best_metric}), " if args.val_csv else ""
    print(f"Done in {time.time() - t0:.0f}s. Wrote {best}checkpoint-last.pth and log.txt in {args.output_dir}")
    cleanup()


def cli_main(argv: list[str] | None = None):
    """Parse `argv` (default: the command line) with parse_args, run."""
    return run_main(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli_main())
