"""MAE pretraining: its training objective, the held-out reconstruction score and the reconstruction picture."""
from __future__ import annotations

import torch

from util.distributed import is_main_process
from util.run_folder import RunFolder
from util.runtime import autocast
from util.task.record import CheckpointRecord
from util.train.settings import TrainSettings
from util.data.transport import to_device


class MaskedReconstruction:
    """The pretraining objective (util.train.loop.Objective): the MAE's masked-patch loss of batches (imgs [N, 1, D,
    H, W], volume indices [N]); which volumes each rank saw is recorded."""
    tracks_batches = True

    def __init__(self, paths: list[str], device: str, mask_ratio: float = 0.75):
        self.paths, self.device, self.mask_ratio = paths, device, mask_ratio

    def loss(self, model, batch) -> torch.Tensor:
        imgs, _ = to_device(batch, self.device)
        loss, _, _ = model(imgs, mask_ratio=self.mask_ratio)
        return loss

    def batch_ids(self, batch) -> list[int]:
        return batch[1].tolist()

    def describe(self, batch) -> list[str]:
        return [self.paths[int(i)] for i in batch[1]]


@torch.no_grad()
def reconstruction_picture(model, img: torch.Tensor, path: str, mask_ratio: float, device: str, precision: str,
                           title: str = "", seed: int = 0, channel_names: list[str] | None = None):
    """The picture of one volume img [C, D, H, W]: the input, its visible patches (masked ones coloured) and the
    reconstruction, which is the model's output in the masked patches with the visible patches pasted back from
    the input (MAE's convention; the output there is not trained), one grid per channel. Written to `path` with
    `title`; returns the HWC uint8 image."""
    from util.volume.figure import save_reconstruction_figure

    m = model.module if hasattr(model, "module") else model
    was_training = m.training
    m.eval()
    x = img.unsqueeze(0).to(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.rand(1, m.num_patches, generator=g).to(device)
    with autocast(precision, device):
        _, pred, mask = m(x, mask_ratio=mask_ratio, noise=noise)
    pred = pred.float()
    target = m.patchify(x)
    if m.norm_pix_loss:  # undo the per-patch (and channel) normalisation with the true patch statistics
        per = target.view(*target.shape[:2], -1, m.in_chans)
        mean, var = per.mean(-2, keepdim=True), per.var(-2, keepdim=True)
        pred = (pred.view_as(per) * (var + 1e-6) ** 0.5 + mean).view_as(target)
    removed = mask.unsqueeze(-1).expand_as(target)
    masked = m.unpatchify(target * (1 - removed))
    recon = m.unpatchify(torch.where(removed.bool(), pred, target))  # MAE convention: visible patches pasted back
    voxel_mask = m.unpatchify(removed)[0, :1]
    m.train(was_training)
    recon = recon[0].clamp(0, 1) if m.in_chans == 1 else recon[0]  # several channels: each over its own range
    return save_reconstruction_figure(x[0].cpu(), masked[0].cpu(), recon.cpu(), path, mask=voxel_mask.cpu(),
                                      title=title, channel_names=channel_names)


@torch.no_grad()
def evaluate_reconstruction(model, loader, mask_ratio: float, device: str, precision: str, seed: int = 0) -> dict:
    """Masked-patch MSE on held-out volumes against the trivial reconstruction.

    Each volume gets the same mask every time (noise seeded by `seed` and its position). The trivial
    reconstruction predicts every removed patch as the mean of the visible voxels of its volume. In
    norm_pix_loss mode both are measured on per-patch normalised targets (the trivial prediction is then 0).
    Returns {'recon_mse', 'baseline_mse', 'ratio'} (ratio = recon / baseline; < 1 means the model learned
    more than the volume's mean intensity). Call on every rank (results are gathered).
    """
    from util.distributed import all_reduce_sum

    m = model.module if hasattr(model, "module") else model
    was_training = m.training
    m.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # model SE, baseline SE, removed voxels
    g = torch.Generator().manual_seed(seed)
    for batch in loader:
        x, _ = to_device(batch, device)
        noise = torch.rand(len(x), m.num_patches, generator=g).to(device)
        with autocast(precision, device):
            _, pred, mask = m(x, mask_ratio=mask_ratio, noise=noise)
        target = m.loss_target(x)
        removed = mask.unsqueeze(-1).expand_as(target)
        if m.norm_pix_loss:  # normalised patches: the trivial prediction of each is its mean, 0
            trivial = torch.zeros_like(target)
        elif m.in_chans > 1:  # each channel's visible mean (voxels ordered (pd, ph, pw, c))
            per, vis = target.view(*target.shape[:2], -1, m.in_chans), (1 - removed).view(*target.shape[:2], -1,
                                                                                           m.in_chans)
            mean = (per * vis).sum((1, 2), keepdim=True) / vis.sum((1, 2), keepdim=True).clamp_min(1)
            trivial = mean.expand_as(per).reshape(target.shape)
        else:
            visible = 1 - removed
            mean = (target * visible).sum((1, 2), keepdim=True) / visible.sum((1, 2), keepdim=True).clamp_min(1)
            trivial = mean.expand_as(target)
        sums += torch.stack([((pred.float() - target) ** 2 * removed).sum().double(),
                             ((trivial - target) ** 2 * removed).sum().double(), removed.sum().double()])
    sums = all_reduce_sum(sums).cpu()
    m.train(was_training)
    recon, base = float(sums[0] / sums[2].clamp_min(1)), float(sums[1] / sums[2].clamp_min(1))
    return {"recon_mse": recon, "baseline_mse": base, "ratio": recon / base if base > 0 else float("nan")}


def channel_names_of(dataset) -> list[str] | None:
    """The channel names of a dataset's preprocessing (None for a user's dataset without one)."""
    cfg = getattr(dataset, "cfg", None)
    return list(cfg.channel_names) if cfg is not None else None


class PretrainEpochs:
    """Pretraining's part of the epoch skeleton (util.train.fit): every checkpoint holds the `base` record (flags,
    recipe, preprocessing); every `save_every` epochs a numbered checkpoint too; every `vis_every` epochs (and the
    last) the held-out score of `val` (a loader, or None) and the reconstruction picture of the `shown` set's first
    volume. `epoch` counts from 0 (as checkpoints store it); every name and line counts from 1."""

    def __init__(self, model, dataset, base: CheckpointRecord, tb, shown, val, folder: RunFolder,
                 train: TrainSettings, mask_ratio: float, save_every: int, vis_every: int, seed: int):
        self.model, self.dataset, self.base, self.tb, self.shown, self.val = model, dataset, base, tb, shown, val
        self.folder, self.train, self.mask_ratio, self.seed = folder, train, mask_ratio, seed
        self.save_every, self.vis_every, self.epochs = save_every, vis_every, train.schedule.epochs

    def checkpoint_record(self) -> CheckpointRecord:
        return self.base

    def end_epoch(self, epoch: int, stats: dict) -> tuple[dict, list[str]]:
        done = epoch + 1
        stats["epoch"] = done  # log.txt counts epochs from 1, like the console and the file names
        if self.dataset.bad_files:
            stats["skipped_files"] = list(self.dataset.bad_files)
        also = []
        if self.save_every and done % self.save_every == 0 and done < self.epochs:  # the last: a link (the script)
            also.append(self.folder.numbered(done))
        if self.vis_every and (done % self.vis_every == 0 or done == self.epochs):
            self.picture(done, stats)
        return stats, also

    def picture(self, done: int, stats: dict) -> None:
        """The held-out score (every rank) and the reconstruction picture of the shown volume (rank 0)."""
        device, precision = self.train.device, self.train.precision
        title = f"epoch {done}/{self.epochs}  train loss {stats['loss']:.4f}"
        if self.val is not None:
            score = evaluate_reconstruction(self.model, self.val, self.mask_ratio, device, precision, self.seed)
            stats.update({f"val_{k}": v for k, v in score.items()})
            title += f"  held-out MSE {score['recon_mse']:.4f} (trivial {score['baseline_mse']:.4f})"
            print(f"epoch {done}/{self.epochs}: held-out masked-patch MSE {score['recon_mse']:.4g}, trivial "
                  f"reconstruction {score['baseline_mse']:.4g} (ratio {score['ratio']:.2f})")
        if is_main_process():
            pic = reconstruction_picture(self.model, self.shown[0][0], self.folder.picture(done), self.mask_ratio,
                                         device, precision, title, channel_names=channel_names_of(self.dataset))
            self.tb.image("reconstruction", pic, done)
