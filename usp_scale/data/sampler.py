"""Distributed sharding over the **global** rank (fixes the official per-node bug, docs/method.md §7, item 5).

Training: a permutation seeded by (seed, epoch), truncated to a multiple of world_size so every
rank gets the same number of samples (as DistributedSampler(drop_last=True)), then rank::world.
Evaluation: no shuffle, no padding, no drop: ranks cover the dataset exactly once (their lengths
differ by at most one).
"""
from __future__ import annotations

from typing import List

import torch


class ShardSampler:
    """Indices of one rank for one epoch, in batches; resumable by batch position."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 even: bool = True, batch_size: int = 1, drop_last: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if n < world_size and even:
            raise ValueError(f"{n} samples cannot be split evenly over {world_size} ranks")
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.shuffle, self.even, self.batch_size, self.drop_last = shuffle, even, batch_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch (int64)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.even:
            order = order[: (self.n // self.world_size) * self.world_size]
        return order[self.rank:: self.world_size]

    def num_batches(self) -> int:
        m = len(self.indices()) if not self.even else self.n // self.world_size
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def batches(self, start: int = 0) -> List[List[int]]:
        """Batches of indices from batch number ``start`` to the end of the epoch."""
        idx = self.indices().tolist()
        nb = self.num_batches()
        return [idx[b * self.batch_size:(b + 1) * self.batch_size] for b in range(start, nb)]
