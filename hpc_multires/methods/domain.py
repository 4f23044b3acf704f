"""Domain decomposition (CNN-DNN, arXiv 2302.06564 and 2408.14442): the input split into a
grid of sub-domains, a local CNN per sub-domain on its own ranks, a dense network (or a
mean, or a vote) combining their outputs, and the coherent global CNN-DNN trained as one
model across the ranks.

The ranks form a 2D process grid, sub-domain by data-parallel replica: with S sub-domains
on W ranks there are R = W / S replicas, and job rank w holds sub-domain w // R as its
replica w % R. The ranks of one sub-domain (a contiguous block) train its local CNN
data-parallel; the ranks of one replica (one of each sub-domain) hold the same samples,
each its own part of them, and their local outputs are gathered into the aggregator's
input.

Here: the config (`DomainConfig`), the layout (`subdomains`, `ProcessGrid`), the
differentiable all-gather (`gather_outputs`) and `CoherentPart`, one rank's share of the
coherent model. The networks are `models/cnn_dnn.py`; the phases are run by
`driver/domain.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from hpc_multires.errors import ConfigError, require

AGGREGATES = ("dnn", "mean", "vote")


@dataclass(frozen=True, kw_only=True)
class DomainConfig:
    """[domain]: train on a grid of sub-domains with local CNNs and an aggregator (off when
    `grid` is empty)."""

    grid: tuple[int, ...] = ()
    """Sub-domains per spatial axis, e.g. [2, 2, 2] for 3D volumes or [2, 2] for images;
    each must divide the samples' side on its axis. Empty: no domain decomposition."""
    overlap: int = 0
    """Points each sub-domain reaches into its neighbours on every side (all sub-domains
    keep one size: those at the border reach twice as far inwards)."""
    aggregate: Literal["dnn", "mean", "vote"] = "dnn"
    """The aggregate the run reports as its result: the dense network ("dnn"), the mean of
    the local outputs ("mean"), or a majority vote of the local classes ("vote",
    classification only). All are evaluated and logged whichever is chosen."""
    hidden: tuple[int, ...] = (64,)
    """The aggregator network's hidden layer sizes."""
    local_epochs: int = 0
    """Epochs of the local CNNs (0: train.epochs)."""
    aggregator_epochs: int = 30
    """Epochs of the aggregator network on the local CNNs' outputs."""
    aggregator_lr: float = 1e-3
    """Its Adam learning rate."""
    aggregator_batch: int = 0
    """Its batch (0: train.global_batch)."""
    coherent_epochs: int = 0
    """Epochs of the coherent global CNN-DNN, started from the local CNNs and the
    aggregator (transfer learning); 0: no coherent phase."""
    coherent_lr: float = 0.0
    """Its learning rate (0: a tenth of train.lr: it starts from trained weights)."""

    @property
    def on(self) -> bool:
        return bool(self.grid)

    @property
    def count(self) -> int:
        """The number of sub-domains."""
        return math.prod(self.grid)

    def check(self) -> None:
        if not self.on:
            return
        require(all(g >= 1 for g in self.grid), "domain.grid", list(self.grid),
                "give sub-domains per spatial axis, each 1 or more (e.g. [2, 2, 2])")
        require(self.count >= 2, "domain.grid", list(self.grid),
                "one sub-domain is the whole sample: split at least one axis (e.g. [2, 2])")
        require(self.overlap >= 0, "domain.overlap", self.overlap, "use 0 or more points")
        require(self.aggregate in AGGREGATES, "domain.aggregate", self.aggregate,
                f"use one of {', '.join(AGGREGATES)}")
        require(all(h >= 1 for h in self.hidden), "domain.hidden", list(self.hidden),
                "give layer sizes of 1 or more (e.g. [64]), or [] for one linear layer")
        for key in ("local_epochs", "aggregator_epochs", "coherent_epochs", "aggregator_batch"):
            require(getattr(self, key) >= 0, f"domain.{key}", getattr(self, key),
                    "use 0 or more")
        require(self.aggregator_epochs >= 1, "domain.aggregator_epochs",
                self.aggregator_epochs, "train the aggregator for at least 1 epoch")
        require(self.aggregator_lr > 0, "domain.aggregator_lr", self.aggregator_lr,
                "use a positive learning rate (e.g. 1e-3)")
        require(self.coherent_lr >= 0, "domain.coherent_lr", self.coherent_lr,
                "use a positive learning rate, or 0 for a tenth of train.lr")
        require(not (self.coherent_epochs and self.aggregate == "vote"),
                "domain.coherent_epochs", self.coherent_epochs,
                "a vote has no gradient to train a coherent model through: use aggregate = "
                "\"dnn\" or \"mean\", or coherent_epochs = 0")


# ---------------------------------------------------------------------- layout


@dataclass(frozen=True)
class SubDomain:
    """One cell of the grid: where its block of every sample starts, and its size."""

    index: int
    start: tuple[int, ...]
    shape: tuple[int, ...]

    def region(self) -> tuple[slice, ...]:
        """Its spatial slices of a sample."""
        return tuple(slice(a, a + n) for a, n in zip(self.start, self.shape, strict=True))


def check_grid(spatial: Sequence[int], grid: Sequence[int], overlap: int,
               where: str = "") -> None:
    """Refuse a grid the samples (`spatial`, their points per axis) cannot be cut into."""
    size = "x".join(map(str, spatial))
    if len(grid) != len(spatial):
        raise ConfigError(
            f"{where}domain.grid = {list(grid)} has {len(grid)} axes, but the samples "
            f"({size}) have {len(spatial)} spatial axes; give one count per axis")
    bad = [(n, g) for n, g in zip(spatial, grid, strict=True) if n % g]
    if bad:
        n, g = bad[0]
        fits = [d for d in range(1, n + 1) if n % d == 0][:6]
        raise ConfigError(
            f"{where}domain.grid = {list(grid)} does not divide the samples of {size}: "
            f"{g} sub-domains cannot split {n} points evenly; use counts that divide each "
            f"side (for {n}: {', '.join(map(str, fits))})")
    widest = max(2 * overlap + n // g for n, g in zip(spatial, grid, strict=True))
    if overlap and any(2 * overlap + n // g > n for n, g in zip(spatial, grid, strict=True)):
        raise ConfigError(
            f"{where}domain.overlap = {overlap} makes sub-domains of {widest} points, wider "
            f"than the samples of {size}; use a smaller overlap")


def subdomains(spatial: Sequence[int], grid: Sequence[int], overlap: int = 0
               ) -> list[SubDomain]:
    """The grid's sub-domains in C order of the grid (the last axis fastest), each of
    side / count + 2 * overlap points per axis, moved inwards at the borders."""
    check_grid(spatial, grid, overlap)
    widths = [n // g for n, g in zip(spatial, grid, strict=True)]
    shape = tuple(w + 2 * overlap for w in widths)
    out = []
    for index in range(math.prod(grid)):
        cell, rest = [], index
        for g in reversed(grid):
            cell.append(rest % g)
            rest //= g
        cell.reverse()
        start = tuple(min(max(c * w - overlap, 0), n - s)
                      for c, w, n, s in zip(cell, widths, spatial, shape, strict=True))
        out.append(SubDomain(index, start, shape))
    return out


@dataclass(frozen=True)
class ProcessGrid:
    """Ranks as sub-domain x replica: rank w holds sub-domain w // replicas."""

    subdomains: int
    replicas: int

    @property
    def world(self) -> int:
        return self.subdomains * self.replicas

    def subdomain_of(self, rank: int) -> int:
        return rank // self.replicas

    def replica_of(self, rank: int) -> int:
        return rank % self.replicas

    def subdomain_ranks(self, d: int) -> tuple[int, ...]:
        """The ranks that train sub-domain d's local CNN, data-parallel."""
        return tuple(range(d * self.replicas, (d + 1) * self.replicas))

    def replica_ranks(self, r: int) -> tuple[int, ...]:
        """The ranks that hold replica r's samples, one per sub-domain, in sub-domain
        order (the order of the gathered outputs)."""
        return tuple(d * self.replicas + r for d in range(self.subdomains))


def process_grid(world: int, grid: Sequence[int]) -> ProcessGrid:
    """The process grid of `world` ranks over the sub-domains of `grid`; refuses a world
    that cannot hold it."""
    count = math.prod(grid)
    if count > world:
        raise ConfigError(
            f"domain.grid = {list(grid)} makes {count} sub-domains, more than the {world} "
            f"rank(s) of the job: each local CNN needs ranks of its own; launch {count} "
            f"ranks (or a multiple of {count}), or use a coarser grid")
    if world % count:
        raise ConfigError(
            f"{world} ranks are not divisible by the {count} sub-domains of domain.grid = "
            f"{list(grid)}: every local CNN trains on the same number of replicas; launch "
            f"{world // count * count} or {(world // count + 1) * count} ranks")
    return ProcessGrid(count, world // count)


# ---------------------------------------------------------------------- the coherent model


class _GatherOutputs(torch.autograd.Function):
    """All-gather with a backward: every rank of the group gets every rank's (b, P), and
    the gradient of each part goes back to the rank that computed it."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: dist.ProcessGroup | None,
                size: int, rank: int) -> torch.Tensor:
        ctx.group, ctx.size, ctx.rank = group, size, rank
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.stack(parts, dim=1)  # (b, S, P)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # The adjoint of a gather is a reduce-scatter; gloo has no reduce-scatter, so an
        # all-reduce and each rank takes its part. Every rank of the group computed the
        # same loss from the same gathered outputs, so the sum over the group counts it
        # `size` times: the mean is the gradient of the one loss.
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total[:, ctx.rank] / ctx.size, None, None, None


def gather_outputs(local: torch.Tensor, group: dist.ProcessGroup | None, size: int,
                   rank: int) -> torch.Tensor:
    """This rank's local outputs (b, P) -> every rank's of the group (b, size, P), in group
    rank order, differentiably (one process: just a new axis)."""
    if size == 1:
        return local[:, None]
    out: torch.Tensor = _GatherOutputs.apply(local, group, size, rank)
    return out


class CoherentPart(nn.Module):
    """One rank's share of the coherent CNN-DNN: its sub-domain's local CNN and the
    aggregator (a copy on every rank). forward(x) takes this rank's sub-domain of its
    replica's samples and returns the model's prediction for them, the local outputs of
    every sub-domain gathered over the replica's ranks.

    The trainer does not wrap it in DDP (`reduces_gradients`): after backward it calls
    `reduce_gradients`, which averages the local CNN's gradients over its sub-domain's
    replicas and the aggregator's over every rank.
    """

    reduces_gradients = True

    def __init__(self, local: nn.Module, aggregator: nn.Module, *, grid: ProcessGrid,
                 rank: int, replica_group: dist.ProcessGroup | None,
                 subdomain_group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.local = local
        self.aggregator = aggregator
        self.grid = grid
        self.rank = rank
        self.replica_group = replica_group
        self.subdomain_group = subdomain_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, C, *sub-domain) -> local (b, P) -> gathered (b, S, P) -> (b, P)
        mine = self.local(x)
        outputs = gather_outputs(mine, self.replica_group, self.grid.subdomains,
                                 self.grid.subdomain_of(self.rank))
        prediction: torch.Tensor = self.aggregator(outputs)
        return prediction

    def reduce_gradients(self) -> None:
        """Average the gradients: the local CNN's over its R replicas, the aggregator's over
        all ranks (its S copies in a replica computed the same gradient, so the mean over
        the world is the mean over the replicas)."""
        grid = self.grid
        if grid.world == 1:
            return
        for module, group, size in ((self.local, self.subdomain_group, grid.replicas),
                                    (self.aggregator, None, grid.world)):
            params = list(module.parameters())
            if not params or size == 1:
                continue
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                              .reshape(-1) for p in params])
            dist.all_reduce(flat, group=group)
            flat /= size
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p).clone()
                offset += n
