"""Batch sampler that groups images by orientation (landscape vs portrait), as the reference does, so a batch
padded to its largest image wastes little. Works for one process and for DDP."""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class AspectRatioBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; every batch holds images of one group (w >= h, or w < h).

    Each epoch: shuffle the indices with a generator seeded by (seed, epoch), cut each group into batches
    (the last batch of a group may be short unless `drop_last`), shuffle the batch order, then deal batches to
    ranks round-robin. The batch list is padded by repeating its first batches (or, with `drop_last`,
    truncated) to a multiple of `world_size`, so every rank yields the same number of batches and the ranks'
    batches are disjoint apart from that padding. Call `set_epoch(epoch)` before each epoch.
    """

    def __init__(self, aspect_ratios: Sequence[float], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.groups = [0 if ratio >= 1.0 else 1 for ratio in aspect_ratios]  # 0: landscape/square, 1: portrait
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_batches_total(self) -> int:
        """Batches over all ranks before padding; depends only on the group sizes, not on the shuffle."""
        rounding = math.floor if self.drop_last else math.ceil
        sizes = [self.groups.count(0), self.groups.count(1)]
        return sum(rounding(n / self.batch_size) for n in sizes)

    def __len__(self) -> int:
        total = self._num_batches_total()
        if self.drop_last:
            return total // self.world_size
        return math.ceil(total / self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        if self.shuffle:
            order = torch.randperm(len(self.groups), generator=generator).tolist()
        else:
            order = list(range(len(self.groups)))

        batches: list[list[int]] = []
        for group in (0, 1):
            members = [i for i in order if self.groups[i] == group]
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle and batches:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

        per_rank = len(self)
        wanted = per_rank * self.world_size
        if batches and len(batches) < wanted:  # pad by repeating batches from the start
            batches = [batches[i % len(batches)] for i in range(wanted)]
        batches = batches[:wanted]
        yield from (list(batch) for batch in batches[self.rank::self.world_size])
