"""MAE pretraining on CT volumes. `python main_pretrain.py` runs the demo; torchrun scales it to many GPUs.

    torchrun --standalone --nproc_per_node=4 main_pretrain.py --data_path scans.csv --output_dir out/
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import models_mae3d
from datasets_three_d import Custom3DDataset
from engine_pretrain import reconstruction_picture, train_one_epoch
from util import cli
from util.checkpoint import find_resume, load_checkpoint, plain, remove_stale_tmp, save_atomic
from util.distributed import barrier, cleanup, is_main_process
from util.logger import TBLogger, append_json_log
from util.lr_decay import param_groups_weight_decay
from util.train_loop import NonFiniteLossError

DEMO_PRESET = dict(model="mae_vit_tiny_patch16", input_size=[64, 64, 64], epochs=20, warmup_epochs=2,
                   batch_size=4, blr=0.064, output_dir="output_dir/demo_pretrain",
                   log_dir="output_dir/demo_pretrain", save_every=5, vis_every=5, num_workers=2)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("3D MAE pretraining", add_help=True)
    p.add_argument("--data_path", default=None, help="CSV with a Path column, or a text file with one path per line "
                                                     "(omit it to run the built-in demo)")
    p.add_argument("--model", default="mae_vit_large_patch16", choices=sorted(models_mae3d.MODEL_FACTORIES))
    p.add_argument("--input_size", type=int, nargs="+", default=[256], help="one int or D H W")
    p.add_argument("--patch_size", type=int, nargs="+", default=[16], help="one int or D H W")
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--norm_pix_loss", action="store_true")
    p.add_argument("--batch_size", type=int, default=8, help="per GPU (effective = batch_size x accum_iter x GPUs)")
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--accum_iter", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="absolute lr; default blr x effective batch / 256")
    p.add_argument("--blr", type=float, default=1.5e-4)
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--warmup_epochs", type=int, default=40)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--clip_grad", type=float, default=None)
    p.add_argument("--output_dir", default="output_dir/pretrain")
    p.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    p.add_argument("--resume", default="auto", help="'auto' (checkpoint-last.pth in --output_dir), a path, or 'none'")
    p.add_argument("--save_every", type=int, default=20)
    p.add_argument("--vis_every", type=int, default=20, help="reconstruction picture every N epochs (0: never)")
    p.add_argument("--num_workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--intensity_jitter", type=float, default=0.0, help="random intensity scale/shift (0: flips only)")
    p.add_argument("--skip_bad", action="store_true", help="skip unreadable volumes (listed in the log) instead of stopping")
    p.add_argument("--print_freq", type=int, default=20)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    cli.add_preprocess_args(p)
    return p


def build_data(args):
    from util.demo import make_demo_data

    if args.data_path is None:
        if is_main_process():
            make_demo_data("demo_data")
        barrier()
        args.data_path = os.path.join("demo_data", "pretrain.csv")
    ds = Custom3DDataset(args.data_path, input_size=args.input_size, train=True, preprocess=args.preprocess,
                         cache_dir=args.cache_dir, seed=args.seed, skip_bad=args.skip_bad,
                         intensity_jitter=args.intensity_jitter)
    if args.distributed:
        sampler = torch.utils.data.DistributedSampler(ds, args.world_size, args.rank, shuffle=True, seed=args.seed)
    else:
        sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(args.seed))
    per_rank = len(ds) // args.world_size
    if per_rank < args.batch_size:
        raise ValueError(f"{args.data_path} has {len(ds)} volumes: fewer than --batch_size {args.batch_size} per "
                         f"process x {args.world_size} processes; lower --batch_size.")
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=args.device.startswith("cuda"),
                                         persistent_workers=False, prefetch_factor=4 if args.num_workers else None)
    return ds, sampler, loader


def build_model(args):
    model = models_mae3d.MODEL_FACTORIES[args.model](img_size=tuple(args.input_size), patch_size=tuple(args.patch_size),
                                                     norm_pix_loss=args.norm_pix_loss)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(args.device)
    if args.compile:
        for blk in list(model.blocks) + list(model.decoder_blocks):
            blk.compile()
    return model


def save_checkpoint(path, model_without_ddp, optimizer, scaler, epoch, args) -> None:
    state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "scaler": scaler.state_dict(), "args": plain(vars(args)), "preprocess": args.preprocess.to_dict(),
             "rng": {"torch": torch.get_rng_state()}}
    save_atomic(state, path)


def try_resume(args, model_without_ddp, optimizer, scaler) -> int:
    """Load model/optimizer/scaler from the resume checkpoint; returns the epoch to start from."""
    if args.resume in (None, "", "none"):
        return 0
    if args.resume == "auto":
        path, ckpt = find_resume(args.output_dir)
        if path is None:
            return 0
    else:
        path, ckpt = args.resume, load_checkpoint(args.resume)
    saved = ckpt.get("args", {})
    if saved.get("model", args.model) != args.model:
        raise ValueError(f"{path} was trained with --model {saved.get('model')}, not {args.model}; "
                         f"use another --output_dir or the same --model.")
    try:
        model_without_ddp.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ValueError(f"{path} does not fit --model {args.model} {tuple(args.input_size)} ({first}); "
                         f"use another --output_dir or --resume none.") from None
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    print(f"Resumed from {path} (finished epoch {ckpt['epoch']}).")
    return int(ckpt["epoch"]) + 1


def main(args) -> None:
    cli.setup_run(args)
    args.log_dir = args.log_dir or args.output_dir
    if is_main_process():
        cli.check_writable_dir(args.output_dir)
        remove_stale_tmp(args.output_dir)
    args.preprocess = cli.preprocess_config_from_args(args)
    cli.seed_all(args.seed + args.rank)

    dataset, sampler, loader = build_data(args)
    model = build_model(args)
    model_without_ddp = model
    eff_batch = args.batch_size * args.accum_iter * args.world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, input {args.input_size}, "
          f"{len(dataset)} volumes, effective batch {eff_batch}, lr {args.lr:.3g}, precision {args.precision}")
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if args.device.startswith("cuda") else None)
    groups = param_groups_weight_decay(model_without_ddp, args.weight_decay, model_without_ddp.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=args.device.startswith("cuda"))
    scaler = torch.amp.GradScaler("cuda" if args.device.startswith("cuda") else "cpu",
                                  enabled=args.precision == "fp16")
    start_epoch = try_resume(args, model_without_ddp, optimizer, scaler)
    tb = TBLogger(args.log_dir)
    if is_main_process():
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(plain(vars(args)) | {"preprocess": args.preprocess.to_dict()}, f, indent=1)

    t_start = time.time()
    for epoch in range(start_epoch, args.epochs):
        # Every random choice of an epoch derives from (seed, epoch, rank): a resumed run replays it exactly.
        cli.seed_all(args.seed * 100_003 + epoch * 1_009 + args.rank)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        else:
            sampler.generator.manual_seed(args.seed * 7919 + epoch)
        dataset.set_epoch(epoch)
        try:
            stats = train_one_epoch(model, loader, optimizer, scaler, epoch, args, tb)
        except NonFiniteLossError as e:
            raise SystemExit(str(e)) from None
        stats["epoch"] = epoch
        if getattr(dataset, "bad_files", None):
            stats["skipped_files"] = list(dataset.bad_files)
        if is_main_process():
            save_checkpoint(os.path.join(args.output_dir, "checkpoint-last.pth"), model_without_ddp, optimizer,
                            scaler, epoch, args)
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
                save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"), model_without_ddp,
                                optimizer, scaler, epoch, args)
            if args.vis_every and ((epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs):
                pic = reconstruction_picture(model_without_ddp, dataset[0][0], args,
                                             os.path.join(args.output_dir, f"reconstruction-{epoch:04d}.png"))
                tb.image("reconstruction", pic, epoch)
            tb.scalars({k: v for k, v in stats.items() if k != "epoch"}, epoch, prefix="epoch/")
            tb.flush()
            append_json_log(args.output_dir, stats)
        barrier()
    if is_main_process():
        save_atomic({"model": model_without_ddp.state_dict(), "args": plain(vars(args)),
                     "preprocess": args.preprocess.to_dict()}, os.path.join(args.output_dir, "mae_pretrained.pth"))
        print(f"Done in {time.time() - t_start:.0f}s. Weights: {os.path.join(args.output_dir, 'mae_pretrained.pth')}")
    tb.close()
    cleanup()


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    if args.data_path is None:
        cli.apply_preset(args, parser, DEMO_PRESET, "demo")
    else:
        print("Using the TANGERINE recipe defaults (ViT-L/16, 256^3, mask 0.75); flags override them.")
    cli.run_main(main, args)
