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
a batch for every step of the epoch the first stream sets (each permutation's remainder
dropped, so that no batch holds a sample twice).
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

    def permutation(self, epoch: int, k: int = 0) -> np.ndarray:
        """The k-th sample order of `epoch` (stream 0 has one per epoch, drawn from (seed,
        epoch); stream s > 0 as many as its steps need, from (seed, epoch, s, k))."""
        if not self.shuffle:
            return self.indices
        key = [self.seed, epoch] if self.stream == 0 else [self.seed, epoch, self.stream, k]
        return self.indices[np.random.default_rng(key).permutation(len(self.indices))]

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self.permutation(epoch)

    def batches(self, epoch: int, start_step: int = 0, num_steps: int | None = None
                ) -> list[np.ndarray]:
        """This rank's index batches for `epoch`, from `start_step` on (for mid-epoch resume);
        `num_steps`: the epoch's steps when another stream sets them (stream > 0: step s
        takes batch s mod steps_per_epoch of permutation s // steps_per_epoch, so no batch
        holds a sample twice)."""
        steps = self.steps_per_epoch if num_steps is None else num_steps
        if self.stream == 0 and steps > self.steps_per_epoch:
            raise ValueError(f"stream 0 has {self.steps_per_epoch} steps per epoch, asked "
                             f"for {steps}")
        orders: dict[int, np.ndarray] = {}
        out = []
        for step in range(start_step, steps):
            k, within = divmod(step, self.steps_per_epoch)
            if k not in orders:
                orders[k] = self.permutation(epoch, k)
            lo = within * self.global_batch + self.rank * self.local_batch
            out.append(orders[k][lo:lo + self.local_batch])
        return out


def shard_evenly(num_items: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous, disjoint share of range(num_items) for `rank` (for evaluation).

    Sizes differ by at most one; every item belongs to exactly one rank.
    """
    lo = num_items * rank // world_size
    hi = num_items * (rank + 1) // world_size
    return np.arange(lo, hi, dtype=np.int64)
