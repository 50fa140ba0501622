"""Samplers whose order is a pure function of (seed, epoch): training can resume at any step of an epoch."""
from __future__ import annotations

import math

import torch


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled training indices for one rank, like DistributedSampler, that can start mid-epoch.

    The n // group groups of `group` consecutive indices (the K crops of one volume) are shuffled as units with
    a generator seeded by (seed, epoch); the list is padded by wrapping to a multiple of world_size groups and
    rank r takes groups r, r + W, ... . `set_epoch(epoch, start)` skips the first `start` indices of this rank.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 group: int = 1) -> None:
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.shuffle, self.group = shuffle, max(1, group)
        self.epoch, self.start = 0, 0
        self.groups_per_rank = math.ceil(n // self.group / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def indices(self) -> list[int]:
        """All indices of this rank for the current epoch (before skipping `start`)."""
        n_groups = self.n // self.group
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(n_groups, generator=g).tolist()
        else:
            order = list(range(n_groups))
        total = self.groups_per_rank * self.world_size
        order = (order * math.ceil(total / max(n_groups, 1)))[:total]
        mine = order[self.rank::self.world_size]
        return [k * self.group + j for k in mine for j in range(self.group)]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.groups_per_rank * self.group - self.start


class EvalShardSampler(torch.utils.data.Sampler):
    """Rank r gets indices r, r + W, r + 2W, ...: every sample exactly once across ranks, no padding duplicates."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
