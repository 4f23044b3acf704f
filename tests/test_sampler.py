"""The global-batch sampler: disjoint, complete, reshuffled, and rank-count independent."""

from __future__ import annotations

import numpy as np
import pytest

from hpc_multires.data.sampler import GlobalBatchSampler, shard_evenly


def global_batches(n: int, batch: int, world: int, epoch: int) -> list[np.ndarray]:
    per_rank = [GlobalBatchSampler(np.arange(n), batch, r, world, seed=7).batches(epoch)
                for r in range(world)]
    return [np.concatenate([per_rank[r][s] for r in range(world)])
            for s in range(len(per_rank[0]))]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_same_global_batches_whatever_the_rank_count(world: int) -> None:
    reference = global_batches(100, 8, 1, epoch=3)
    assert all(np.array_equal(a, b)
               for a, b in zip(reference, global_batches(100, 8, world, 3), strict=True))


def test_disjoint_and_complete_up_to_the_dropped_tail() -> None:
    batches = global_batches(100, 8, 4, epoch=0)
    seen = np.concatenate(batches)
    assert len(batches) == 12 and len(seen) == 96 and len(set(seen.tolist())) == 96


def test_reshuffled_per_epoch_and_reproducible() -> None:
    e0, e1 = global_batches(64, 8, 2, 0), global_batches(64, 8, 2, 1)
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))
    assert all(np.array_equal(a, b) for a, b in zip(e0, global_batches(64, 8, 2, 0), strict=True))


def test_resume_mid_epoch_continues_the_same_order() -> None:
    s = GlobalBatchSampler(np.arange(64), 8, 1, 2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(s.batches(2)[3:], s.batches(2, 3),
                                                     strict=True))


def test_indices_subset_is_respected() -> None:
    s = GlobalBatchSampler(np.arange(50, 90), 8, 0, 1, seed=0)
    drawn = np.concatenate(s.batches(0)).tolist()
    assert sorted(drawn) == list(range(50, 90))  # 5 batches of 8: each index once


def test_shard_evenly_partitions() -> None:
    parts = [shard_evenly(10, r, 4) for r in range(4)]
    assert np.array_equal(np.concatenate(parts), np.arange(10))
    assert {len(p) for p in parts} == {2, 3}
