"""One epoch of MAE pretraining, and the reconstruction picture."""
from __future__ import annotations

import torch

from util import train_loop
from util.cli import autocast


def train_one_epoch(model, loader, optimizer, scaler, epoch: int, args, tb=None) -> dict:
    """Pretrain for one epoch on batches (imgs [N, 1, D, H, W], dataset indices [N])."""
    def compute_loss(m, batch):
        loss, _, _ = m(batch[0].to(args.device, non_blocking=True), mask_ratio=args.mask_ratio)
        return loss

    return train_loop.train_one_epoch(
        model, loader, optimizer, scaler, epoch, args, compute_loss, tb, batch_ids=lambda b: b[1].tolist(),
        describe=lambda b: [loader.dataset.paths[int(i)] for i in b[1]])


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
