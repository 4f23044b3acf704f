"""Data partitioned across nodes: the shard assignment and the sampler's partitioned draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpc_multires.data.partition import assign_shards, plan_partition
from hpc_multires.data.sampler import GlobalBatchSampler, Shares
from hpc_multires.data.store import ShardInfo, shard_name
from hpc_multires.errors import DataError


def shards(sizes: list[int]) -> list[ShardInfo]:
    out, first = [], 0
    for i, n in enumerate(sizes):
        out.append(ShardInfo(Path("/data") / shard_name(i), i, first, n))
        first += n
    return out


def test_assignment_balances_samples_per_rank_and_is_deterministic() -> None:
    counts = [32, 32, 32, 32, 16, 16]
    nodes = assign_shards(counts, [1, 1])
    load = [sum(c for c, k in zip(counts, nodes, strict=True) if k == n) for n in (0, 1)]
    assert load == [80, 80] and nodes == assign_shards(counts, [1, 1])
    # A node with twice the ranks takes about twice the samples.
    nodes = assign_shards([10] * 9, [2, 1])
    assert [nodes.count(0), nodes.count(1)] == [6, 3]
    # Shards without training samples belong to no node.
    assert assign_shards([5, 0, 5], [1, 1]) == [0, -1, 1]


def test_plan_covers_the_training_set_once_and_copies_validation_everywhere() -> None:
    # 5 shards of 16; the last 20 samples are validation: shard 4 wholly, shard 3 in part.
    p = plan_partition(shards([16] * 5), 60, rank_nodes=(0, 0, 1, 1), where="d")
    union = np.sort(np.concatenate(p.shares.indices))
    assert np.array_equal(union, np.arange(60))  # every training sample in one share
    for k in (0, 1):
        held = p.files(k)
        assert {"shard-00003.h5", "shard-00004.h5"} <= held  # the validation samples
        starts = [int(n[6:11]) * 16 for n in held]
        # a node's samples lie in the shards it holds
        assert all(any(s <= i < s + 16 for s in starts) for i in p.shares.indices[k])
    assert p.shard_nodes[4] == -1 and sorted(len(s) for s in p.shares.indices) == [28, 32]
    assert "2 node(s)" in p.describe()


def test_more_nodes_than_shards_is_one_clear_error() -> None:
    with pytest.raises(DataError, match=r"3 nodes .* has 2: run on at most 2 nodes"):
        plan_partition(shards([8, 8]), 16, rank_nodes=(0, 1, 2), where="'d'")


def partitioned_epoch(shares: Shares, batch: int, epoch: int, stream: int = 0
                      ) -> list[list[np.ndarray]]:
    """Each step's per-rank batches over the job's ranks."""
    world = len(shares.rank_nodes)
    per_rank = [GlobalBatchSampler(np.concatenate(shares.indices), batch, r, world, seed=5,
                                   stream=stream, shares=shares).batches(epoch)
                for r in range(world)]
    return [list(step) for step in zip(*per_rank, strict=True)]


@pytest.mark.parametrize("rank_nodes", [(0, 1), (0, 0, 1, 1), (0, 0, 0, 1, 1, 1),
                                        (0, 1, 0, 1), (0, 0, 1, 1, 2, 2, 3, 3)])
def test_partitioned_draw_reads_every_sample_once_from_its_node(rank_nodes) -> None:
    nodes = max(rank_nodes) + 1
    per_node = 96 // nodes
    shares = Shares(tuple(np.arange(k * per_node, (k + 1) * per_node) for k in range(nodes)),
                    rank_nodes)
    world = len(rank_nodes)
    batch = 4 * world
    for epoch in (0, 1):
        steps = partitioned_epoch(shares, batch, epoch)
        seen = np.concatenate([b for step in steps for b in step])
        # each node's share divides into its ranks' batches: nothing dropped
        assert sorted(seen.tolist()) == list(range(96)), epoch
        for step in steps:
            assert sum(len(b) for b in step) == batch  # the global batch keeps its size
            for r, b in enumerate(step):
                assert set((b // per_node).tolist()) == {rank_nodes[r]}  # its node's share
    a = np.concatenate([b for s in partitioned_epoch(shares, batch, 0) for b in s])
    b = np.concatenate([b for s in partitioned_epoch(shares, batch, 1) for b in s])
    assert not np.array_equal(a, b)  # reshuffled per epoch


def test_uneven_shares_drop_the_larger_share_s_remainder_and_resume_exactly() -> None:
    shares = Shares((np.arange(0, 40), np.arange(40, 72)), (0, 0, 1, 1))
    s = [GlobalBatchSampler(np.arange(72), 8, r, 4, seed=1, shares=shares) for r in range(4)]
    assert s[0].steps_per_epoch == 8  # 32 // (2 ranks x 2)
    seen = np.concatenate([b for x in s for b in x.batches(3)])
    assert len(seen) == 64 and len(set(seen.tolist())) == 64
    assert set(range(40, 72)) <= set(seen.tolist())  # the smaller share is read whole
    assert s[0].layout == [[2, 40], [2, 32]]
    # A resumed epoch continues the same order.
    assert all(np.array_equal(a, b) for a, b in zip(s[2].batches(3)[5:], s[2].batches(3, 5),
                                                     strict=True))


def test_a_stage_group_samples_from_the_nodes_of_its_ranks() -> None:
    # job ranks 0,1 on node 0 and 2,3 on node 1; a stage on job ranks (1, 3)
    shares = Shares((np.arange(0, 16), np.arange(16, 32)), (0, 0, 1, 1))
    got = [GlobalBatchSampler(np.arange(32), 4, r, 2, seed=0, shares=shares,
                              ranks=(1, 3)).batches(0) for r in range(2)]
    assert all(b.max() < 16 for b in got[0]) and all(b.min() >= 16 for b in got[1])
    with pytest.raises(ValueError, match="nodes \\[1\\] hold samples"):
        GlobalBatchSampler(np.arange(32), 4, 0, 2, seed=0, shares=shares, ranks=(0, 1))


def test_a_second_stream_reads_its_node_s_share_too() -> None:
    # MGE's second request: a batch twice the first's, its own draw, still from the node.
    shares = Shares((np.arange(0, 48), np.arange(48, 96)), (0, 1))
    first = GlobalBatchSampler(np.arange(96), 8, 1, 2, seed=2, shares=shares)
    second = GlobalBatchSampler(np.arange(96), 16, 1, 2, seed=2, stream=1, shares=shares)
    got = second.batches(0, num_steps=first.steps_per_epoch)
    assert len(got) == first.steps_per_epoch == 12
    assert all(len(b) == 8 and b.min() >= 48 and len(set(b.tolist())) == 8 for b in got)


def test_config_refuses_a_partition_it_cannot_stage() -> None:
    from hpc_multires.data.config import DataConfig
    from hpc_multires.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.stage = 'partition': .*set data.stage_to"):
        DataConfig(path="d", stage="partition").check()
    with pytest.raises(ConfigError, match=r"data.stage = 'partition': MPI-IO .* 'auto' or 'off'"):
        DataConfig(path="d", stage="partition", stage_to="/tmp", mpio="on").check()
    with pytest.raises(ConfigError, match=r"data.stage = 'part': use one of 'copy', 'partition'"):
        DataConfig(path="d", stage="part").check()


def test_a_stage_must_reach_every_node_and_fill_its_batches_from_each_share() -> None:
    from conftest import ROOT

    from hpc_multires.driver.run import check_partition
    from hpc_multires.errors import ConfigError
    from hpc_multires.plan.load import load_config
    from hpc_multires.plan.stages import resolve
    from hpc_multires.train.loop import Split

    shares = Shares((np.arange(0, 40), np.arange(40, 60)), (0, 0, 1, 1))
    split = Split(None, np.arange(60), shares)  # type: ignore[arg-type]
    mrmf = load_config(ROOT / "configs" / "cosmoflow-mrmf.toml", ["train.global_batch=8"])
    coarse2, _, fine = resolve(mrmf, 4)
    with pytest.raises(ConfigError, match=r"stage 'coarse2' has no rank on node\(s\) \[1\].*"
                                          r"--distribution=cyclic"):
        check_partition(mrmf, coarse2, split)
    check_partition(mrmf, fine, split)  # 20 samples fill 2 ranks x 2
    big = load_config(ROOT / "configs" / "cosmoflow-mrmf.toml", ["train.global_batch=48"])
    with pytest.raises(ConfigError, match=r"stage 'fine': node 1's share of the training set, "
                                          r"20 samples, cannot fill its part of a global batch "
                                          r"of 48 at level 0 \(2 rank\(s\) x 12\)"):
        check_partition(big, resolve(big, 4)[2], split)


def test_a_mid_epoch_checkpoint_is_refused_on_another_node_layout(tmp_path: Path) -> None:
    """The rest of an epoch follows the node layout: a checkpoint written inside an epoch
    resumes on the layout that wrote it, and is refused on another with one line."""
    import time

    import torch
    from conftest import write_arrays_store

    from hpc_multires.comm.dist import Comm
    from hpc_multires.comm.ranks import RankInfo
    from hpc_multires.data.config import DataConfig
    from hpc_multires.data.store import SampleStore
    from hpc_multires.errors import UserError
    from hpc_multires.train.config import LogConfig, TrainConfig
    from hpc_multires.train.loop import Split, Trainer
    from hpc_multires.train.metrics import MetricsLog, Progress
    from hpc_multires.train.spec import RunSettings, StageSpec

    rng = np.random.default_rng(0)
    store = SampleStore(write_arrays_store(tmp_path / "data",
                                           rng.normal(size=(24, 2, 16)).astype(np.float32),
                                           rng.uniform(-1, 1, (24, 2)).astype(np.float32)))
    stage = StageSpec(name="s", level=0, group="all", ranks=(0,),
                      train=TrainConfig(epochs=1, global_batch=4, lr=0.01,
                                        checkpoint_every_steps=2, checkpoint_keep=10))
    run = RunSettings(seed=1, data=DataConfig(num_workers=0), log=LogConfig(every_steps=1))

    def trainer(share: int, run_dir: Path) -> Trainer:
        run_dir.mkdir()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 2))
        split = Split(store, np.arange(16), Shares((np.arange(share),), (0,)))
        return Trainer(stage, run, Comm(RankInfo(0, 1, 0, 1, 0, 1, "single"),
                                        torch.device("cpu")),
                       model, split, Split(store, np.arange(16, 24)), run_dir / "ckpt",
                       MetricsLog(run_dir / "metrics.jsonl", enabled=True),
                       Progress(4, enabled=False, interval_s=30.0), time.monotonic)

    assert trainer(16, tmp_path / "a").fit()["step"] == 4
    mid = sorted((tmp_path / "a" / "ckpt").glob("*step*"))[0]
    assert torch.load(mid, weights_only=False)["data_layout"] == [[1, 16]]
    assert trainer(16, tmp_path / "b").fit(resume_from=mid)["step"] == 4
    with pytest.raises(UserError, match=r"partitioned across nodes as \(ranks, samples\) per "
                                        r"node \[\[1, 16\]\]; here it is \[\[1, 12\]\]"):
        trainer(12, tmp_path / "c").fit(resume_from=mid)
