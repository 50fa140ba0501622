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

import torch

import models_vit3d
from datasets_three_d import PreprocessConfig, VolumeError
from engine_finetune import (EvalShardSampler, build_criterion, build_optimizer, default_best_metric, evaluate,
                             is_better, loss_weights, make_meta, train_one_epoch)
from util.train_loop import NonFiniteLossError
from util import cli
from util.checkpoint import clean_state_dict, find_resume, load_checkpoint, plain, remove_stale_tmp, save_atomic
from util.distributed import barrier, cleanup, is_main_process
from util.logger import TBLogger, append_json_log
from util.model_build import build_model_from_meta

DEMO_PRETRAIN = os.path.join("output_dir", "demo_pretrain")
DEMO_PRESET = dict(model="vit_tiny_patch16", input_size=[64, 64, 64], epochs=10, warmup_epochs=1, batch_size=4,
                   blr=0.032, finetune="demo", train_csv=os.path.join("demo_data", "train.csv"),
                   val_csv=os.path.join("demo_data", "val.csv"), output_dir=os.path.join("output_dir", "demo_finetune"),
                   num_workers=2, print_freq=5)
LINPROBE_PRESET = dict(blr=0.1, weight_decay=0.0, drop_path=0.0, smoothing=0.0)  # MAE linear-probe recipe


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("3D ViT finetuning", add_help=True)
    g = p.add_argument_group("data and task")
    g.add_argument("--train_csv", default=None, help="CSV with Path and label columns (omit all CSVs for the demo)")
    g.add_argument("--val_csv", default=None)
    g.add_argument("--test_csv", default=None, help="scored once with the best checkpoint after training")
    g.add_argument("--task", default="classification", choices=["classification", "segmentation"])
    g.add_argument("--label_columns", nargs="+", default=None, help="label column(s); several = multi-label")
    g.add_argument("--nb_classes", type=int, default=None, help="default: from the training labels / masks")
    g.add_argument("--regression", action="store_true", help="MSE on the label column(s) instead of classes")
    g.add_argument("--pos_weight", nargs="+", default=None, help="BCE positive weight(s), or 'auto' (neg/pos)")
    g.add_argument("--class_weights", default="none", choices=["auto", "none"], help="multiclass CE class weights")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (multiclass)")
    g.add_argument("--fg_prob", type=float, default=0.5, help="segmentation: share of crops centred on foreground")
    g.add_argument("--intensity_jitter", type=float, default=0.0)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_large_patch16", choices=sorted(models_vit3d.VIT_FACTORIES))
    g.add_argument("--input_size", type=int, nargs="+", default=[256], help="one int or D H W")
    g.add_argument("--patch_size", type=int, nargs="+", default=[16], help="one int or D H W")
    g.add_argument("--pool", default="avg", choices=["avg", "token", "cat"], help="TANGERINE classifiers used cat")
    g.add_argument("--feature_size", type=int, default=16, help="UNETR decoder width (segmentation)")
    g.add_argument("--drop_path", type=float, default=0.1)
    g.add_argument("--finetune", default=None, help="pretrained checkpoint (ours or TANGERINE); omit for scratch")
    g.add_argument("--linprobe", action="store_true", help="freeze the encoder; BatchNorm + linear head, LARS")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=8, help="per GPU (effective = batch_size x accum_iter x GPUs)")
    g.add_argument("--epochs", type=int, default=50)
    g.add_argument("--accum_iter", type=int, default=1)
    g.add_argument("--lr", type=float, default=None, help="absolute lr; default blr x effective batch / 256")
    g.add_argument("--blr", type=float, default=1e-3)
    g.add_argument("--layer_decay", type=float, default=0.75)
    g.add_argument("--min_lr", type=float, default=1e-6)
    g.add_argument("--warmup_epochs", type=int, default=5)
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--clip_grad", type=float, default=None)
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=None, help="default output_dir/finetune (--eval: the checkpoint's folder)")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    g.add_argument("--resume", default="auto", help="'auto', a path or 'none'; with --eval: the checkpoint to score")
    g.add_argument("--eval", action="store_true", help="only evaluate a finetuned checkpoint on --val_csv")
    g.add_argument("--metrics_json", default=None, help="--eval output (default OUTPUT_DIR/eval_metrics.json)")
    g.add_argument("--best_metric", default=None, help="default auroc (classification), mae (regression), dice")
    g.add_argument("--sw_batch_size", type=int, default=2, help="sliding-window batch (segmentation eval)")
    g.add_argument("--sw_overlap", type=float, default=0.5)
    g.add_argument("--num_workers", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    g.add_argument("--grad_checkpointing", action="store_true")
    g.add_argument("--print_freq", type=int, default=20)
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    cli.add_preprocess_args(p)
    return p


def resolve_demo_checkpoint() -> str:
    """The demo pretraining weights made by `python main_pretrain.py`, or a one-sentence exit saying so."""
    for name in ("mae_pretrained.pth", "checkpoint-last.pth"):
        path = os.path.join(DEMO_PRETRAIN, name)
        if os.path.isfile(path):
            return path
    raise SystemExit(f"No demo pretraining checkpoint in {DEMO_PRETRAIN}/ (mae_pretrained.pth or checkpoint-last.pth): "
                     f"run `python main_pretrain.py` first to make it, or pass --finetune none to train from scratch.")


def make_dataset(csv_path: str, train: bool, args, nb_classes: int | None = None):
    """Training set (random crops, flips) or eval set (centre crop; whole volumes for segmentation)."""
    from datasets_three_d_fine import Custom3DDataset

    try:
        return Custom3DDataset(csv_path, input_size=args.input_size, train=train, preprocess=args.preprocess,
                               task=args.task, label_columns=args.label_columns, regression=args.regression,
                               cache_dir=args.cache_dir, seed=args.seed, fg_prob=args.fg_prob,
                               intensity_jitter=args.intensity_jitter if train else 0.0,
                               nb_classes=nb_classes or args.nb_classes,
                               whole_volume=not train and args.task == "segmentation")  # for sliding windows
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None


def make_eval_loader(ds, args):
    sampler = EvalShardSampler(len(ds), args.rank, args.world_size)
    return torch.utils.data.DataLoader(ds, batch_size=1 if args.task == "segmentation" else args.batch_size,
                                       sampler=sampler, num_workers=args.num_workers, shuffle=False,
                                       pin_memory=args.device.startswith("cuda"))


def build_data(args):
    """Training set/sampler/loader, and eval loaders for --val_csv and --test_csv (None when not given)."""
    train_ds = make_dataset(args.train_csv, True, args)
    if args.distributed:
        sampler = torch.utils.data.DistributedSampler(train_ds, args.world_size, args.rank, seed=args.seed)
    else:
        sampler = torch.utils.data.RandomSampler(train_ds, generator=torch.Generator().manual_seed(args.seed))
    if len(train_ds) // args.world_size < args.batch_size:
        raise SystemExit(f"{args.train_csv} has {len(train_ds)} volumes: fewer than --batch_size {args.batch_size} "
                         f"per process x {args.world_size} processes; lower --batch_size.")
    loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=args.device.startswith("cuda"),
                                         prefetch_factor=4 if args.num_workers else None)
    k = train_ds.nb_classes if not (args.regression or train_ds.multilabel) else None  # same classes everywhere
    evals = [make_eval_loader(make_dataset(p, False, args, k), args) if p else None
             for p in (args.val_csv, args.test_csv)]
    return train_ds, sampler, loader, evals[0], evals[1]


def build_model(args, meta: dict):
    """Model for `meta`, encoder loaded from --finetune, head initialised, encoder frozen for --linprobe."""
    model = build_model_from_meta(meta, drop_path=args.drop_path)
    vit = getattr(model, "encoder", model)
    if args.finetune:
        load_finetune(vit, args)
    if meta["mode"] != "segmentation":
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
            blk.compile()
    return model


def load_finetune(vit, args) -> None:
    """Load a pretrained encoder (our MAE, TANGERINE, or a finetuned ViT) into `vit`; user errors exit cleanly."""
    try:
        ckpt = load_checkpoint(args.finetune)
        info = models_vit3d.load_pretrained_encoder(vit, ckpt, verbose=True)
    except (ValueError, FileNotFoundError) as e:
        msg = str(e)
        raise SystemExit(msg if args.finetune in msg else f"--finetune {args.finetune}: {msg}") from None
    if not info["loaded"]:
        raise SystemExit(f"--finetune {args.finetune} holds no weights of the {args.model} encoder.")
    pre = ckpt.get("preprocess") or {}
    for key in ("window", "orientation"):
        if key in pre and plain(pre[key]) != plain(getattr(args, key)):
            print(f"WARNING: {args.finetune} was pretrained with --{key} {pre[key]}; this run uses "
                  f"{plain(getattr(args, key))}.")
    print(f"Loaded {len(info['loaded'])} tensors from {args.finetune}.")


def save_checkpoint(path, model, optimizer, scaler, epoch, args, meta, **extra) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "scaler": scaler.state_dict(), "args": plain(vars(args)), "meta": meta,
             "preprocess": args.preprocess.to_dict(), **extra}
    save_atomic(state, path)


def try_resume(args, model, optimizer, scaler, meta) -> tuple[int, dict]:
    """Load model/optimizer/scaler; returns (start epoch, best-so-far record)."""
    if args.resume in (None, "", "none"):
        return 0, {}
    path, ckpt = find_resume(args.output_dir) if args.resume == "auto" else (args.resume, load_checkpoint(args.resume))
    if path is None:
        return 0, {}
    saved = ckpt.get("meta") or {}
    diff = [k for k in ("model", "mode", "nb_outputs", "input_size", "patch_size", "global_pool", "linprobe")
            if saved.get(k) != meta[k]]
    if diff:
        raise SystemExit(f"{path} was trained with a different {diff[0]} ({saved.get(diff[0])}, not {meta[diff[0]]}); "
                         f"use another --output_dir or --resume none.")
    model.load_state_dict(clean_state_dict(ckpt["model"]))
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    print(f"Resumed from {path} (finished epoch {ckpt['epoch']}).")
    return int(ckpt["epoch"]) + 1, ckpt.get("best") or {}


def end_of_epoch(args, ckpt_parts: tuple, meta: dict, metrics: dict, best: dict, epoch: int) -> dict:
    """Update the best record; rank 0 writes checkpoint-best.pth (when improved) and checkpoint-last.pth."""
    if metrics and args.best_metric not in metrics:
        raise SystemExit(f"--best_metric {args.best_metric} is not computed here; choose one of {sorted(metrics)}.")
    improved = bool(metrics) and is_better(metrics[args.best_metric], best.get("value"), args.best_metric)
    if improved:
        best = {"metric": args.best_metric, "value": metrics[args.best_metric], "epoch": epoch}
    if is_main_process():
        model, optimizer, scaler, weights = ckpt_parts
        names = (["checkpoint-best.pth"] if improved else []) + ["checkpoint-last.pth"]
        for name in names:
            save_checkpoint(os.path.join(args.output_dir, name), model, optimizer, scaler, epoch, args, meta,
                            best=best, metrics=metrics, loss_weights=weights)
    if metrics:
        print(f"Epoch {epoch}: val {args.best_metric} {metrics[args.best_metric]:.4f} "
              f"(best {best.get('value', float('nan')):.4f} at epoch {best.get('epoch')})")
    return best


def train(args) -> None:
    train_ds, sampler, loader, val_loader, test_loader = build_data(args)
    meta = make_meta(args, train_ds)
    args.mode = meta["mode"]
    args.best_metric = args.best_metric or default_best_metric(args.mode)
    try:
        weights = loss_weights(args.mode, args, train_ds)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    criterion = build_criterion(args.mode, args.smoothing, weights, args.device)
    model = model_without_ddp = build_model(args, meta)
    eff_batch = args.batch_size * args.accum_iter * args.world_size
    args.lr = args.lr or args.blr * eff_batch / 256
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.model} ({meta['mode']}, {meta['nb_outputs']} outputs, {n_train / 1e6:.2f}M trainable): input "
          f"{args.input_size}, {len(train_ds)} training volumes, effective batch {eff_batch}, lr {args.lr:.3g}")
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if args.device.startswith("cuda") else None)
    optimizer = build_optimizer(args, model_without_ddp)
    scaler = torch.amp.GradScaler("cuda" if args.device.startswith("cuda") else "cpu", enabled=args.precision == "fp16")
    start_epoch, best = try_resume(args, model_without_ddp, optimizer, scaler, meta)
    tb = TBLogger(args.log_dir)
    for epoch in range(start_epoch, args.epochs):
        cli.seed_all(args.seed * 100_003 + epoch * 1_009 + args.rank)  # a resumed run replays each epoch exactly
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        else:
            sampler.generator.manual_seed(args.seed * 7919 + epoch)
        train_ds.set_epoch(epoch)
        try:
            stats = train_one_epoch(model, criterion, loader, optimizer, scaler, epoch, args, tb)
        except NonFiniteLossError as e:
            raise SystemExit(str(e)) from None
        metrics = evaluate(model_without_ddp, criterion, val_loader, args, meta) if val_loader else {}
        best = end_of_epoch(args, (model_without_ddp, optimizer, scaler, weights), meta, metrics, best, epoch)
        stats = {**{f"train_{k}": v for k, v in stats.items()}, **{f"val_{k}": v for k, v in metrics.items()},
                 "epoch": epoch}
        if is_main_process():
            tb.scalars({k: v for k, v in stats.items() if k != "epoch"}, epoch, prefix="epoch/")
            tb.flush()
            append_json_log(args.output_dir, stats)
        barrier()
    tb.close()
    if test_loader is not None:
        score_test(args, model_without_ddp, criterion, test_loader, meta)


def score_test(args, model, criterion, loader, meta) -> None:
    """Score --test_csv once with the best checkpoint (the last one when there is no validation set)."""
    path = os.path.join(args.output_dir, "checkpoint-best.pth")
    path = path if os.path.isfile(path) else os.path.join(args.output_dir, "checkpoint-last.pth")
    model.load_state_dict(load_checkpoint(path)["model"])
    metrics = evaluate(model, criterion, loader, args, meta)
    print(f"Test ({args.test_csv}, {os.path.basename(path)}): {json.dumps(metrics)}")
    write_json(os.path.join(args.output_dir, "test_metrics.json"),
               {"checkpoint": path, "csv": args.test_csv, **metrics})


def write_json(path: str, obj: dict) -> None:
    if is_main_process():
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)


def eval_checkpoint_path(args) -> str:
    """--eval target: --resume PATH, else --finetune PATH, else the best (or last) checkpoint in --output_dir."""
    for p in (args.resume, args.finetune):
        if p not in (None, "", "auto", "none", "demo"):
            return p
    folder = args.output_dir or os.path.join("output_dir", "finetune")
    for name in ("checkpoint-best.pth", "checkpoint-last.pth"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise SystemExit(f"--eval needs a finetuned checkpoint: pass --resume PATH (none found in {folder}).")


def run_eval(args) -> dict:
    """Score a finetuned checkpoint on --val_csv with the preprocessing and model saved in it."""
    path = eval_checkpoint_path(args)
    try:
        ckpt = load_checkpoint(path)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    meta, saved = ckpt.get("meta"), ckpt.get("args") or {}
    if meta is None:
        raise SystemExit(f"{path} is not a finetuned checkpoint (it has no 'meta'); --eval scores the "
                         f"checkpoints written by main_finetune.py.")
    if not args.val_csv:
        raise SystemExit("--eval needs --val_csv (a CSV with Path and label columns).")
    model = build_model_from_meta(meta)
    model.load_state_dict(clean_state_dict(ckpt["model"]))
    model.to(args.device)
    args.preprocess = PreprocessConfig.from_dict(ckpt["preprocess"])
    args.input_size, args.task, args.mode = list(meta["input_size"]), meta["task"], meta["mode"]
    args.regression = meta["mode"] == "regression"
    args.label_columns = args.label_columns or meta.get("label_columns")
    k = meta["nb_classes"] if meta["mode"] in ("binary", "multiclass", "segmentation") else None
    loader = make_eval_loader(make_dataset(args.val_csv, False, args, k), args)
    criterion = build_criterion(meta["mode"], saved.get("smoothing", 0.0), ckpt.get("loss_weights"), args.device)
    metrics = evaluate(model, criterion, loader, args, meta)
    out_dir = args.output_dir or os.path.dirname(os.path.abspath(path))
    out = args.metrics_json or os.path.join(out_dir, "eval_metrics.json")
    print(f"Eval of {path} on {args.val_csv}: {json.dumps(metrics)}")
    if is_main_process():
        cli.check_writable_dir(os.path.dirname(os.path.abspath(out)), "--metrics_json folder")
    write_json(out, {"checkpoint": path, "csv": args.val_csv, **metrics})
    print(f"Metrics written to {out}")
    return metrics


def main(args) -> None:
    cli.setup_run(args)
    cli.seed_all(args.seed + args.rank)
    if getattr(args, "demo", False):
        if is_main_process():
            from util.demo import make_demo_data

            make_demo_data("demo_data")
        barrier()
    if args.finetune == "demo":
        args.finetune = None if args.eval else resolve_demo_checkpoint()
    if args.finetune in ("none", ""):
        args.finetune = None
    if args.eval:
        run_eval(args)
        cleanup()
        return
    if args.task == "segmentation" and (args.linprobe or args.regression):
        raise SystemExit("--task segmentation cannot be combined with --linprobe or --regression.")
    if not args.train_csv:
        raise SystemExit("Training needs --train_csv (and usually --val_csv); or pass --eval to score a checkpoint.")
    args.output_dir = args.output_dir or os.path.join("output_dir", "finetune")
    args.log_dir = args.log_dir or args.output_dir
    if is_main_process():
        cli.check_writable_dir(args.output_dir)
        remove_stale_tmp(args.output_dir)
    args.preprocess = cli.preprocess_config_from_args(args)
    t0 = time.time()
    try:
        train(args)
    except VolumeError as e:  # a bad volume or mask met while loading: one sentence, no traceback
        raise SystemExit(str(e).strip().splitlines()[-1].removeprefix("datasets_three_d.VolumeError: ")
                         .removeprefix("VolumeError: ")) from None
    print(f"Done in {time.time() - t0:.0f}s. Checkpoints in {args.output_dir}")
    cleanup()


def cli_main(argv: list[str] | None = None) -> None:
    """Parse `argv`, apply the demo preset (no CSV given) and the linear-probe recipe, run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.demo = not (args.train_csv or args.val_csv or args.test_csv)
    if args.demo:
        cli.apply_preset(args, parser, DEMO_PRESET, "demo", argv)
    if args.linprobe:
        cli.apply_preset(args, parser, LINPROBE_PRESET, "linear-probe", argv)
    cli.run_main(main, args)


if __name__ == "__main__":
    cli_main()
