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

A partitioned training set (`data.stage = "partition"`, data/partition.py) comes as
`Shares`: the samples each node holds. Each node then gives its ranks' part of every
global batch from its own share: node k's order of epoch e is a permutation of its share
drawn from (seed, e, stream, k-th permutation, node), step s takes the next
(its ranks in the stage) x (local batch) samples of it, and its ranks take equal slices
of those in rank order. The global batch keeps its size (each rank still gives its local
batch); an epoch has as many steps as the smallest share per rank fills, and a node with
a larger share drops its remainder (a different one each epoch), as the unpartitioned
order drops the global remainder. Which samples make up a step now depends on the node
layout, so a resume needs the same one (`layout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shares:
    """A training set partitioned across nodes: the sample indices each node holds, and
    the node each job rank runs on."""

    indices: tuple[np.ndarray, ...]
    """Per node, the training samples of its shards (sorted)."""
    rank_nodes: tuple[int, ...]
    """Per job rank, its node index."""

    def groups(self, ranks: Sequence[int]) -> list[list[int]]:
        """Per node, the positions in `ranks` (a stage's job ranks) that run on it."""
        out: list[list[int]] = [[] for _ in self.indices]
        for i, r in enumerate(ranks):
            out[self.rank_nodes[r]].append(i)
        return out


class GlobalBatchSampler:
    """Per-rank index batches of one epoch, derived from (seed, epoch) only."""

    def __init__(self, indices: np.ndarray, global_batch: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True, stream: int = 0,
                 shares: Shares | None = None, ranks: Sequence[int] | None = None) -> None:
        """`shares`: the training set partitioned across nodes (then `indices` is their
        union); `ranks`: the job ranks of the sampler's `world_size` (a stage's group;
        default all)."""
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
        self.shares = shares
        # Where this rank's samples come from: the whole set, or its node's share, of
        # which each step takes `share_batch` and this rank the slice at `offset`.
        self.share, self.share_batch, self.offset = self.indices, global_batch, \
            rank * self.local_batch
        self.node = 0
        if shares is not None:
            groups = shares.groups(range(world_size) if ranks is None else ranks)
            empty = [k for k, g in enumerate(groups) if not g and len(shares.indices[k])]
            if empty:
                raise ValueError(f"nodes {empty} hold samples but run no rank of this sampler")
            self.node = next(k for k, g in enumerate(groups) if rank in g)
            self.share = np.asarray(shares.indices[self.node], dtype=np.int64)
            self.share_batch = len(groups[self.node]) * self.local_batch
            self.offset = groups[self.node].index(rank) * self.local_batch
            self._steps = min(len(shares.indices[k]) // (len(g) * self.local_batch)
                              for k, g in enumerate(groups) if g)
            self.layout = [[len(g), len(shares.indices[k])] for k, g in enumerate(groups)]
        else:
            self._steps = len(self.indices) // global_batch
            self.layout = []

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch; the remainder is dropped (a different one each
        epoch): of the whole set, or of each node's share."""
        return self._steps

    def permutation(self, epoch: int, k: int = 0) -> np.ndarray:
        """The k-th sample order of `epoch` (stream 0 has one per epoch, drawn from (seed,
        epoch); stream s > 0 as many as its steps need, from (seed, epoch, s, k))."""
        if not self.shuffle:
            return self.share
        if self.shares is not None:
            key = [self.seed, epoch, self.stream, k, self.node]
        else:
            key = [self.seed, epoch] if self.stream == 0 else [self.seed, epoch, self.stream, k]
        return self.share[np.random.default_rng(key).permutation(len(self.share))]

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
            lo = within * self.share_batch + self.offset
            out.append(orders[k][lo:lo + self.local_batch])
        return out


def shard_evenly(num_items: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous, disjoint share of range(num_items) for `rank` (for evaluation).

    Sizes differ by at most one; every item belongs to exactly one rank.
    """
    lo = num_items * rank // world_size
    hi = num_items * (rank + 1) // world_size
    return np.arange(lo, hi, dtype=np.int64)
