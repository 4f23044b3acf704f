"""Data partitioned across nodes (`data.stage = "partition"`): which node stages which shards.

A dataset larger than a node's local disk or memory is staged a share per node. The
shards that hold training samples are assigned to nodes, balanced by training samples
per rank: largest shard first, each to the node with the least load per rank so far
(ties to the lower node), so every rank computes the same assignment from the shard
headers and the node layout alone. Each node copies its own shards. Shards that hold
validation samples (the held-out tail of data.path) are copied to every node, and so is
data.val_path: validation reads the whole validation set as a full copy does, with the
same metrics; its training samples still belong to one node's share. The sampler
(`sampler.Shares`) then draws each rank's part of every global batch from its node's
share. The unit is a file of the store: a shard, or a volume store's file of arrays.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_multires.data.sampler import Shares
from hpc_multires.data.store import ShardInfo
from hpc_multires.errors import DataError


def assign_shards(train_counts: Sequence[int], node_ranks: Sequence[int]) -> list[int]:
    """The node of each shard (-1: it holds no training samples), balanced by training
    samples per rank of each node (`node_ranks`: ranks on node k)."""
    load = [0] * len(node_ranks)
    out = [-1] * len(train_counts)
    for i in sorted(range(len(train_counts)), key=lambda i: (-train_counts[i], i)):
        if train_counts[i] <= 0:
            continue
        k = min(range(len(node_ranks)), key=lambda k: (load[k] / node_ranks[k], k))
        out[i] = k
        load[k] += train_counts[i]
    return out


@dataclass(frozen=True)
class Partition:
    """Which shards each node stages, and the training samples each node holds."""

    names: tuple[str, ...]
    """File names of the store's shards, in sample order."""
    shard_nodes: tuple[int, ...]
    """Per shard, the node whose share its training samples are (-1: none)."""
    everywhere: tuple[bool, ...]
    """Per shard, whether every node copies it (it holds validation samples)."""
    shares: Shares
    """Per node, its training samples; per job rank, its node."""

    def files(self, node: int) -> set[str]:
        """The shard files node `node` copies."""
        return {name for name, k, every in zip(self.names, self.shard_nodes, self.everywhere,
                                               strict=True) if k == node or every}

    def describe(self) -> str:
        sizes = [len(s) for s in self.shares.indices]
        counts = Counter(self.shares.rank_nodes)
        held = [len(self.files(k)) for k in range(len(sizes))]
        return (f"partitioned over {len(sizes)} node(s): training samples per node "
                f"{sizes}, ranks per node {[counts[k] for k in range(len(sizes))]}, "
                f"shard files per node {held} of {len(self.names)}")


@dataclass(frozen=True)
class LocalShare:
    """What a rank reads of a partitioned dataset: its node's copy of some files."""

    directory: Path
    """The node's copy."""
    files: frozenset[str]
    """The shard files in it (`Partition.files` of the node)."""
    shares: Shares
    """Every node's training samples."""


def plan_partition(shards: Sequence[ShardInfo], num_train: int, rank_nodes: Sequence[int],
                   where: str) -> Partition:
    """The partition of a store's `shards` whose first `num_train` samples are the training
    set (the rest validation), over the nodes of `rank_nodes` (the node of each job rank).
    `where`: the dataset, for messages."""
    counts = Counter(rank_nodes)
    nodes = len(counts)
    if sorted(counts) != list(range(nodes)):
        raise ValueError(f"node indices {sorted(counts)} are not 0..{nodes - 1}")
    starts = [s.first_sample for s in shards]
    train = [max(0, min(s.first_sample + s.num_samples, num_train) - s.first_sample)
             for s in shards]
    holding = sum(1 for n in train if n > 0)
    if holding < nodes:
        raise DataError(
            f"data.stage = 'partition' on {nodes} nodes needs at least one shard of training "
            f"samples per node; {where} has {holding}: run on at most {holding} nodes, set "
            "data.stage = 'copy', or write the dataset in more shards (--samples-per-shard)")
    node_of = assign_shards(train, [counts[k] for k in range(nodes)])
    indices = np.arange(num_train, dtype=np.int64)
    shard_of = np.searchsorted(np.asarray(starts), indices, side="right") - 1
    owner = np.asarray(node_of, dtype=np.int64)[shard_of] if len(indices) else indices
    shares = Shares(tuple(indices[owner == k] for k in range(nodes)), tuple(rank_nodes))
    return Partition(tuple(s.path.name for s in shards), tuple(node_of),
                     tuple(s.first_sample + s.num_samples > num_train for s in shards), shares)
