"""Which samples each rank reads at each step.

The global batch is the unit: epoch e is a permutation of the training samples drawn
from (seed, e) alone; step s takes positions [s*B, (s+1)*B) of it, and rank r of n takes
the r-th of n equal slices of that batch. So the samples of every optimizer step are the
same whatever the number of ranks, ranks never overlap, and a resumed run sees the same
order as an uninterrupted one (nothing here has state).
"""

from __future__ import annotations

import numpy as np


class GlobalBatchSampler:
    """Per-rank index batches of one epoch, derived from (seed, epoch) only."""

    def __init__(self, indices: np.ndarray, global_batch: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} not divisible by {world_size} ranks")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch; the remainder is dropped (a different one each epoch)."""
        return len(self.indices) // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        rng = np.random.default_rng([self.seed, epoch])
        return self.indices[rng.permutation(len(self.indices))]

    def batches(self, epoch: int, start_step: int = 0) -> list[np.ndarray]:
        """This rank's index batches for `epoch`, from `start_step` on (for mid-epoch resume)."""
        order = self.epoch_order(epoch)
        out = []
        for step in range(start_step, self.steps_per_epoch):
            lo = step * self.global_batch + self.rank * self.local_batch
            out.append(order[lo:lo + self.local_batch])
        return out


def shard_evenly(num_items: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous, disjoint share of range(num_items) for `rank` (for evaluation).

    Sizes differ by at most one; every item belongs to exactly one rank.
    """
    lo = num_items * rank // world_size
    hi = num_items * (rank + 1) // world_size
    return np.arange(lo, hi, dtype=np.int64)
