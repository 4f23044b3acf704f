"""Which samples each rank reads at each step.

The global batch is the unit: epoch e is a permutation of the training samples drawn
from (seed, e) alone; step s takes positions [s*B, (s+1)*B) of it, and rank r of n takes
the r-th of n equal slices of that batch. So the samples of every optimizer step are the
same whatever the number of ranks, ranks never overlap, and a resumed run sees the same
order as an uninterrupted one (nothing here has state).

A step that reads several batches (the multiscale gradient estimator: one per pyramid
level, each its own draw) has one sampler per batch, told apart by `stream`: stream s > 0
orders epoch e by permutations drawn from (seed, e, s), as many laid end to end as the
epoch's steps need, so a stream whose batch is larger than the first stream's still has
a batch for every step of the epoch the first stream sets.
"""

from __future__ import annotations

import numpy as np


class GlobalBatchSampler:
    """Per-rank index batches of one epoch, derived from (seed, epoch) only."""

    def __init__(self, indices: np.ndarray, global_batch: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True, stream: int = 0) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} not divisible by {world_size} ranks")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.stream = stream

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch; the remainder is dropped (a different one each epoch)."""
        return len(self.indices) // self.global_batch

    def epoch_order(self, epoch: int, length: int = 0) -> np.ndarray:
        """The epoch's sample order, at least `length` long (stream > 0: permutations laid
        end to end; stream 0 has one permutation, enough for its own steps)."""
        if not self.shuffle:
            return np.tile(self.indices, max(1, -(-length // max(len(self.indices), 1))))
        if self.stream == 0:
            rng = np.random.default_rng([self.seed, epoch])
            return self.indices[rng.permutation(len(self.indices))]
        parts = [self.indices[np.random.default_rng([self.seed, epoch, self.stream, k])
                              .permutation(len(self.indices))]
                 for k in range(max(1, -(-length // len(self.indices))))]
        return np.concatenate(parts)

    def batches(self, epoch: int, start_step: int = 0, num_steps: int | None = None
                ) -> list[np.ndarray]:
        """This rank's index batches for `epoch`, from `start_step` on (for mid-epoch resume);
        `num_steps`: the epoch's steps when another stream sets them (stream > 0)."""
        steps = self.steps_per_epoch if num_steps is None else num_steps
        if self.stream == 0 and steps > self.steps_per_epoch:
            raise ValueError(f"stream 0 has {self.steps_per_epoch} steps per epoch, asked "
                             f"for {steps}")
        order = self.epoch_order(epoch, steps * self.global_batch)
        out = []
        for step in range(start_step, steps):
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
