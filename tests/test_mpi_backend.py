"""The mpi gradient backend (`comm.backend = "mpi"`): parity with DDP on 1, 2 and 4 ranks,
per-group communicators for concurrent stages, resumption, and the reducer itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hpc_multires.comm.mpi_allreduce import GradientReducer, MpiGroups
from hpc_multires.comm.ranks import RankInfo
from hpc_multires.errors import ConfigError, UserError


def step_losses(run: Path) -> np.ndarray:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in recs if r["kind"] == "step"])


def final_model(run: Path, stage: str = "main") -> dict[str, torch.Tensor]:
    return torch.load(run / "stages" / stage / "final.pt", weights_only=False)["model"]


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_mpi_matches_ddp(cli, tiny_1_epoch, tmp_path: Path, ranks: int) -> None:
    """Same seed, global batch and data order: the same losses as DDP.

    Both average the same per-rank gradients; the mpi backend scales the loss by 1/ranks
    (exact for 2 and 4) and sums with MPI, DDP divides the gradients and sums with gloo:
    only the order of the float32 sums differs, ~1e-7 relative per step. 1e-4 is far
    below what a missing average, a sum instead of a mean, or ranks starting from
    different weights would give. The DDP runs are the session's (test_parity_1_2_4_ranks
    compares them across rank counts, so mpi on 4 ranks matches DDP on 1 too)."""
    run = tmp_path / "mpi"
    r = cli(["train", str(tiny_1_epoch.config), "--run-dir", str(run), "--set",
             "comm.backend=mpi"], ranks=ranks, timeout=240)
    assert r.returncode == 0, r.stderr
    ddp = tiny_1_epoch.run(ranks)
    losses = {"ddp": step_losses(ddp), "mpi": step_losses(run)}
    assert len(losses["ddp"]) == 9 and np.ptp(losses["ddp"]) > 1e-3
    np.testing.assert_allclose(losses["mpi"], losses["ddp"], rtol=1e-4, atol=0)
    for k, v in final_model(ddp).items():
        torch.testing.assert_close(final_model(run)[k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.mpi
def test_concurrent_stages_reduce_within_their_groups(cli, mrmf_4_ranks, tmp_path: Path
                                                      ) -> None:
    """MRMF's two coarse stages on ranks {0,1} and {2,3} at once, on the mpi backend.

    Each group reduces over its own MPI communicator; gradients averaged over all four
    ranks would train each coarse model on the other's gradients too, and would not match
    DDP's run of the same plan, whose groups are separate torch process groups."""
    run = tmp_path / "mpi"
    r = cli(["train", str(mrmf_4_ranks.config), "--run-dir", str(run), "--set",
             "comm.backend=mpi"], ranks=4, timeout=300)
    assert r.returncode == 0, r.stderr
    ddp = mrmf_4_ranks.run(4)
    for stage in ("coarse1", "coarse2", "fine"):
        for k, v in final_model(ddp, stage).items():
            torch.testing.assert_close(final_model(run, stage)[k], v, rtol=1e-4, atol=1e-5,
                                       msg=f"{stage} {k}")


@pytest.mark.mpi
def test_resumed_inside_an_epoch_equals_straight(cli, tiny_config, tmp_path: Path) -> None:
    """2 ranks on mpi, checkpoints every 4 steps over 2 epochs of 9: a run that lost
    everything after step 12 (inside epoch 2) resumes from there and ends as the straight
    run does, bit for bit: the reducer keeps nothing between steps that a checkpoint
    would miss, and the resumed ranks start from the same weights."""
    cfg = str(tiny_config(epochs=2))
    opts = ["--set", "comm.backend=mpi", "--set", "train.checkpoint_every_steps=4",
            "--set", "train.checkpoint_keep=10"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    a = cli(["train", cfg, "--run-dir", str(straight), *opts], ranks=2, timeout=240)
    assert a.returncode == 0, a.stderr
    shutil.copytree(straight, crashed)
    ckpts = crashed / "stages" / "main" / "checkpoints"
    for name in ("epoch-0002-step-00000016.pt", "epoch-0002.pt"):  # what the crash lost
        (ckpts / name).unlink()
    (crashed / "stages" / "main" / "final.pt").unlink()
    b = cli(["train", cfg, "--run-dir", str(crashed), "--resume", *opts], ranks=2,
            timeout=240)
    assert b.returncode == 0, b.stderr
    assert "resumed from epoch-0002-step-00000012.pt" in b.stderr
    assert list(step_losses(crashed)) == list(step_losses(straight))
    fa, fb = final_model(straight), final_model(crashed)
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k
    mid = torch.load(ckpts / "epoch-0002-step-00000012.pt", weights_only=False)["model"]
    assert any(not torch.equal(mid[k], fb[k]) for k in fb)  # the resumed part trained


def single(world_size: int = 1) -> RankInfo:
    return RankInfo(rank=0, world_size=world_size, local_rank=0, local_size=world_size,
                    node_index=0, node_count=1, launcher="single")


def test_mpi_backend_refuses_gpu_tensors() -> None:
    with pytest.raises(ConfigError, match="comm.backend.*ddp"):
        MpiGroups([(0,)], single(), torch.device("cuda", 0))


def test_mpi_backend_needs_an_mpi_launch() -> None:
    # Two ranks that MPI does not connect (this process is an MPI world of one).
    with pytest.raises(UserError, match="mpiexec"):
        MpiGroups([(0, 1)], RankInfo(rank=0, world_size=2, local_rank=0, local_size=2,
                                     node_index=0, node_count=1, launcher="torchrun"),
                  torch.device("cpu"))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 40)
        self.b = nn.Linear(40, 30)
        self.unused = nn.Linear(3, 3)  # gets no gradient
        self.c = nn.Linear(30, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_reducer_buckets_hold_the_gradients() -> None:
    """On one process (MPI's COMM_SELF), with buckets small enough that there are several:
    after `wait` every .grad equals plain backward's and is a view of a bucket, on every
    step (accumulated in place, zeroed in between); the unused layer's gradients are 0,
    and a .grad set to None by someone else is put back in its bucket."""
    from mpi4py import MPI

    torch.manual_seed(0)
    net = Net()
    x, y = torch.randn(5, 6), torch.randn(5, 2)
    reference = []
    for step in range(3):
        net.zero_grad()
        nn.functional.mse_loss(net(x * (step + 1)), y).backward()
        reference.append({n: p.grad.clone() for n, p in net.named_parameters()
                          if p.grad is not None})
    comm = MPI.COMM_SELF.Dup()
    reducer = GradientReducer(list(net.parameters()), comm, bucket_bytes=800,
                              first_bucket_bytes=100)
    assert len(reducer.buckets) >= 3 and reducer.hooked
    try:
        for step in range(3):
            reducer.zero_grad()
            if step == 1:
                net.b.weight.grad = None  # an optimizer's zero_grad, say
            (nn.functional.mse_loss(net(x * (step + 1)), y) * reducer.scale).backward()
            reducer.wait()
            for name, p in net.named_parameters():
                bucket = reducer.buckets[reducer.where[p][0]]
                assert p.grad is not None and p.grad.untyped_storage().data_ptr() == \
                    bucket.untyped_storage().data_ptr(), name
                expected = reference[step].get(name, torch.zeros_like(p))
                torch.testing.assert_close(p.grad, expected, rtol=0, atol=0, msg=name)
    finally:
        reducer.close()
        comm.Free()
