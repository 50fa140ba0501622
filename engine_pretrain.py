"""One epoch of MAE pretraining, and the reconstruction picture."""
from __future__ import annotations

import math
import time

import torch

from util import lr_sched
from util.cli import autocast
from util.distributed import all_gather_objects, all_reduce_mean
from util.faults import fault_point
from util.logger import Progress


class NonFiniteLossError(RuntimeError):
    pass


def _check_finite(pending, epoch: int, dataset) -> None:
    """Raise if the loss of an earlier step was not finite (checked one step late so the GPU never waits)."""
    if pending is None:
        return
    loss, step, idx = pending
    if not math.isfinite(float(loss)):
        paths = [dataset.paths[int(i)] for i in idx]
        raise NonFiniteLossError(
            f"Loss became {float(loss)} at epoch {epoch}, step {step}; batch files: {paths}. "
            f"The run stopped and the last good checkpoint was kept; lower --blr, use --clip_grad, or check these volumes.")


def train_one_epoch(model, loader, optimizer, scaler, epoch: int, args, tb=None) -> dict:
    """Pretrain for one epoch. Loss and grad norm are pulled to the host only every print_freq steps.

    Gradient accumulation: the loss is divided by accum_iter, DDP gradient sync happens only on the last micro-step,
    and gradients are zeroed once per optimizer step.
    """
    model.train()
    device = args.device
    n_steps = len(loader)
    progress = Progress(n_steps, f"Epoch [{epoch}]", args.print_freq, args.batch_size * args.world_size)
    loss_sum = torch.zeros((), device=device)
    gnorm = torch.zeros((), device=device)
    count, pending, vps, t0 = 0, None, 0.0, time.time()
    seen: list[int] = []
    optimizer.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    for it, (imgs, idx) in enumerate(loader):
        fault_point(f"step:{epoch}:{it}")
        last_micro = (it + 1) % args.accum_iter == 0 or it + 1 == n_steps
        if it % args.accum_iter == 0:
            lr = lr_sched.adjust_learning_rate(optimizer, it / n_steps + epoch, args)
        imgs = imgs.to(device, non_blocking=True)
        sync_ctx = model.no_sync() if (args.distributed and not last_micro) else _null()
        with sync_ctx:
            with autocast(args.precision, device):
                loss, _, _ = model(imgs, mask_ratio=args.mask_ratio)
            scaler.scale(loss / args.accum_iter).backward()
        if last_micro:
            scaler.unscale_(optimizer)
            gnorm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        loss_d = loss.detach()
        _check_finite(pending, epoch, loader.dataset)
        pending = (loss_d, it, idx)
        seen.extend(idx.tolist())
        loss_sum += loss_d
        count += 1
        if progress.due(it):
            loss_avg = all_reduce_mean(loss_sum / count, device)
            vps = progress.show(it, loss=loss_avg, lr=lr, grad_norm=float(gnorm))
            if tb is not None:
                step = epoch * n_steps + it
                mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else 0.0
                tb.scalars({"loss": loss_avg, "lr": lr, "grad_norm": float(gnorm), "volumes_per_s": vps,
                            "gpu_mem_gib": mem}, step, prefix="train/")
    _check_finite(pending, epoch, loader.dataset)
    loss_avg = all_reduce_mean(loss_sum / max(count, 1), device)
    per_rank = all_gather_objects(seen)  # a few ints per rank: proves ranks saw disjoint volumes
    total = sum(len(s) for s in per_rank)
    return {"loss": loss_avg, "lr": lr, "volumes_per_s": total / (time.time() - t0),
            "volumes": total, "unique_volumes": len(set().union(*map(set, per_rank)))}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@torch.no_grad()
def reconstruction_picture(model, img: torch.Tensor, args, path: str, seed: int = 0):
    """Input / masked input / reconstruction for one volume img [1, D, H, W]; returns the HWC uint8 image."""
    from util.visualize import save_reconstruction_figure

    m = model.module if hasattr(model, "module") else model
    was_training = m.training
    m.eval()
    x = img.unsqueeze(0).to(args.device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.rand(1, m.num_patches, generator=g).to(args.device)
    with autocast(args.precision, args.device):
        _, pred, mask = m(x, mask_ratio=args.mask_ratio, noise=noise)
    pred = pred.float()
    target = m.patchify(x)
    if m.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    removed = mask.unsqueeze(-1).expand_as(target)
    masked = m.unpatchify(target * (1 - removed))
    recon = m.unpatchify(torch.where(removed.bool(), pred, target))  # MAE convention: visible patches pasted back
    voxel_mask = m.unpatchify(removed)[0, :1]
    m.train(was_training)
    return save_reconstruction_figure(x[0].cpu(), masked[0].cpu(), recon[0].clamp(0, 1).cpu(), path,
                                      mask=voxel_mask.cpu())
