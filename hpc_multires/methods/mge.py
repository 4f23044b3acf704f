"""The multiscale gradient estimator (MGE; Ahamed, Zakariaei, Haber, Eliasof, "Multiscale
Training of Convolutional Neural Networks", arXiv 2501.12739).

A fully convolutional network runs on every level of a pyramid with one set of weights.
Write ``L_l(theta; b)`` for the mean loss of batch ``b`` at level ``l`` (level 0 the finest
of the stage, level ``l + 1`` the restriction of level ``l``). The fine-level gradient
telescopes::

    grad L_0 = grad L_K + sum_{l < K} (grad L_l - grad L_{l+1})

and MGE estimates each term on its own batch: the coarsest one on ``b_K`` at level K, the
correction of level ``l`` on ``b_l`` seen at level ``l`` and, restricted, at level ``l + 1``.
Since a correction is a difference on the same samples at two resolutions, its variance is
small when the network's loss changes little between them, so it needs a small batch; the
cheap coarse term gets the large batch. Batch sizes grow by a factor per coarser level
(`level_batch_sizes`).

Each batch must be its own draw (`draw_level_indices`, `split_level_indices`): with the same
samples at every level the sum telescopes on the samples themselves and the estimate is the
plain fine-level gradient of the finest batch, whatever the coarse levels cost.

Unbiasedness needs the level-``(l + 1)`` data of the correction to be the data the level
``l + 1`` term is drawn from: restrict level ``l`` with the operator that made level ``l + 1``.
The store's pyramid levels are block averages, and ``restrict(x, "avg")`` of level ``l`` is
exactly level ``l + 1``; with "nearest" or "bilinear", make every level from the finest with
`restrict` itself.

The estimator is `mge_loss`: a pure function of (model, loss, the level batches) that returns
a scalar whose gradient is the MGE estimate, so the training step calls ``backward`` on it as
on any loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpc_multires.data.loader import ReadCorruption
from hpc_multires.train.objective import Batch as TrainBatch
from hpc_multires.train.objective import BatchRequest, Objective, StepLoss, Validation

RestrictMode = Literal["avg", "nearest", "bilinear"]
RESTRICT_MODES: tuple[str, ...] = ("avg", "nearest", "bilinear")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
IndexSampler = Callable[[int], np.ndarray]
Batch = tuple[torch.Tensor, torch.Tensor]

__all__ = [
    "RESTRICT_MODES",
    "MGELoss",
    "MultiscaleGradient",
    "RestrictMode",
    "draw_level_indices",
    "level_batch_sizes",
    "mge_loss",
    "mge_step_cost",
    "restrict",
    "split_level_indices",
    "uniform_sampler",
]


def restrict(x: torch.Tensor, mode: RestrictMode = "avg", times: int = 1) -> torch.Tensor:
    """Halve every spatial axis `times` times: (B, C, *S) -> (B, C, *S / 2^times).

    avg: mean of each 2^d block (the pyramid's restriction). nearest: the first point of each
    block. bilinear (2D only): antialiased bilinear, weights (1, 3, 3, 1) / 8 per axis,
    renormalised at the border (multigrid's full weighting); plain bilinear at scale 1/2
    would be "avg".
    """
    if mode not in RESTRICT_MODES:
        raise ValueError(f"restriction {mode!r}: use one of {RESTRICT_MODES}")
    dims = x.dim() - 2
    if not 1 <= dims <= 3:
        raise ValueError(f"restrict takes (B, C, *spatial) with 1 to 3 spatial axes, got shape "
                         f"{tuple(x.shape)}")
    if mode == "bilinear" and dims != 2:
        raise ValueError(f"bilinear restriction is for images (B, C, H, W); these samples have "
                         f"{dims} spatial axes: use 'avg' or 'nearest'")
    for _ in range(times):
        if any(s % 2 for s in x.shape[2:]):
            raise ValueError(f"cannot halve spatial axes {tuple(x.shape[2:])}: the finest "
                             "level's sides must be divisible by 2^(levels - 1)")
        if mode == "avg":
            x = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1](x, 2)
        elif mode == "nearest":
            every_other: tuple[slice, ...] = (slice(None),) * 2 + (slice(None, None, 2),) * dims
            x = x[every_other]
        else:
            x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False,
                              antialias=True)
    return x


def level_batch_sizes(finest: int, levels: int, growth: float = 2.0) -> list[int]:
    """Batch size of each level, finest first: finest * growth^l, rounded."""
    if finest < 1 or levels < 1:
        raise ValueError(f"MGE batch sizes: finest batch {finest} and {levels} levels; use "
                         "at least 1 of each")
    if not growth >= 1.0:
        raise ValueError(f"MGE batch growth {growth}: use a factor >= 1 (coarser levels are "
                         "cheaper, so they take batches at least as large)")
    return [max(1, round(finest * growth**level)) for level in range(levels)]


def mge_step_cost(sizes: Sequence[int], dims: int = 2) -> float:
    """Work of one MGE step in level-0 samples (a level-l sample costs 2^(-dims l) of one):
    every correction evaluates its batch at two levels, the coarsest term at one."""
    coarsest = len(sizes) - 1
    cost = sizes[coarsest] * 2.0 ** (-dims * coarsest)
    for level, n in enumerate(sizes[:-1]):
        cost += n * (2.0 ** (-dims * level) + 2.0 ** (-dims * (level + 1)))
    return cost


def uniform_sampler(num_samples: int, rng: np.random.Generator) -> IndexSampler:
    """Draws n distinct indices of range(num_samples), uniformly, from `rng`."""
    def draw(n: int) -> np.ndarray:
        return rng.choice(num_samples, size=n, replace=False)
    return draw


def draw_level_indices(sampler: IndexSampler, sizes: Sequence[int]) -> list[np.ndarray]:
    """One independent draw of `sizes[l]` sample indices for each level l."""
    out = []
    for level, n in enumerate(sizes):
        idx = np.asarray(sampler(n), dtype=np.int64)
        if idx.shape != (n,) or len(np.unique(idx)) != n:
            raise ValueError(f"the index sampler gave {idx.shape} indices with "
                             f"{len(np.unique(idx))} distinct for level {level}; it must "
                             f"return {n} distinct indices")
        out.append(idx)
    return out


def split_level_indices(batch: np.ndarray, sizes: Sequence[int], rank: int = 0,
                        world_size: int = 1) -> list[np.ndarray]:
    """Cut one global batch (sum(sizes) indices, e.g. a step of `GlobalBatchSampler`'s epoch
    order) into disjoint consecutive per-level batches; returns this rank's equal slice of
    each. Disjoint parts of a uniform permutation are each a uniform draw."""
    batch = np.asarray(batch, dtype=np.int64)
    if len(batch) != sum(sizes):
        raise ValueError(f"a global batch of {len(batch)} indices cannot be cut into level "
                         f"batches of {list(sizes)}; take sum(sizes) = {sum(sizes)} per step")
    bad = [n for n in sizes if n % world_size]
    if bad:
        raise ValueError(f"level batch sizes {list(sizes)} are not all divisible by "
                         f"{world_size} ranks ({bad}); choose sizes that are")
    out, start = [], 0
    for n in sizes:
        local = n // world_size
        out.append(batch[start + rank * local:start + (rank + 1) * local])
        start += n
    return out


@dataclass(frozen=True)
class MGELoss:
    loss: torch.Tensor
    """Scalar whose gradient is the MGE estimate of the fine-level gradient (its value is the
    same estimate of the fine-level loss)."""
    terms: tuple[torch.Tensor, ...]
    """Detached, finest first: the correction L_l(b_l) - L_{l+1}(R b_l) of each level l < K,
    then L_K(b_K). Tensors, so logging them adds no device sync until read."""


def mge_loss(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch],
             restriction: RestrictMode = "avg", restrict_targets: bool = True) -> MGELoss:
    """The MGE loss of one step from per-level batches.

    batches[l] = (inputs (B_l, C, *S_l), targets) is level l's own draw at level l (S_l =
    S_0 / 2^l); K = len(batches) - 1. Targets that are images are restricted with the inputs
    (`restrict_targets`); labels (B, P) are not. `loss_fn(prediction, target)` is the mean
    over the batch. With one level this is the plain loss of batches[0].
    """
    if not batches:
        raise ValueError("MGE needs the batch of at least one level")
    coarsest = len(batches) - 1
    terms = []
    total: torch.Tensor | None = None
    for level, (inputs, targets) in enumerate(batches):
        fine = loss_fn(model(inputs), targets)
        if level < coarsest:
            coarse_targets = restrict(targets, restriction) if restrict_targets else targets
            term = fine - loss_fn(model(restrict(inputs, restriction)), coarse_targets)
        else:
            term = fine
        terms.append(term.detach())
        total = term if total is None else total + term
    assert total is not None
    return MGELoss(total, tuple(terms))


class MultiscaleGradient(Objective):
    """MGE as a stage's objective: the loss of `mge_loss` over one batch per level, each its
    own draw, with the per-batch criterion of the objective it wraps (`base`: regression,
    or an image task, whose clean targets are restricted with the inputs).

    The stage's own level is the finest; level l of the estimator is pyramid level
    (stage level + l). With restriction "avg" each level's batch is read from its pyramid
    level (which holds exactly the block means of the finer one); with "nearest" or
    "bilinear" every batch is read at the stage's level and restricted l times here, so
    each coarse term sees the restriction its correction uses. Validation, the corruption
    of an image task and the headline are the base objective's.
    """

    def __init__(self, base: Objective, levels: int, growth: float,
                 restriction: RestrictMode = "avg") -> None:
        if restriction not in RESTRICT_MODES:
            raise ValueError(f"restriction {restriction!r}: use one of {RESTRICT_MODES}")
        self.base = base
        self.levels = levels
        self.growth = growth
        self.restriction = restriction
        self.headline = base.headline
        self.higher_is_better = base.higher_is_better

    @property
    def from_pyramid(self) -> bool:
        """Each level's batch is read from its own pyramid level (avg restriction)."""
        return self.restriction == "avg"

    def sizes(self, global_batch: int) -> list[int]:
        """Each level's global batch, finest first."""
        return level_batch_sizes(global_batch, self.levels, self.growth)

    def requests(self, level: int, global_batch: int) -> list[BatchRequest]:
        return [BatchRequest(level + (k if self.from_pyramid else 0), n)
                for k, n in enumerate(self.sizes(global_batch))]

    def loss(self, model: nn.Module, batches: Sequence[TrainBatch], step: int) -> StepLoss:
        finest = batches[0].level
        pairs = []
        for k, batch in enumerate(batches):  # batch k on level finest + k
            times = finest + k - batch.level  # restrictions still to apply (0 from the pyramid)
            x, y = batch.x, batch.y  # (b_k, C, *S), (b_k, P) or (b_k, C, *S)
            if times:
                x = restrict(x, self.restriction, times)
                if y.dim() > 2:
                    y = restrict(y, self.restriction, times)
            pairs.append((x, y))
        out = mge_loss(model, self.base.criterion, pairs, self.restriction,
                       restrict_targets=batches[0].y.dim() > 2)
        # Each level's term, finest first: the corrections, then the coarsest loss.
        return StepLoss(out.loss, {f"mge_term{k}": t for k, t in enumerate(out.terms)})

    def criterion(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.base.criterion(prediction, target)

    def validation(self, label_names: Sequence[str], crop: int) -> Validation:
        return self.base.validation(label_names, crop)

    def corruption(self, epoch: int | None) -> ReadCorruption | None:
        return self.base.corruption(epoch)

    def reference(self, train_y: np.ndarray, val_y: np.ndarray) -> dict[str, float]:
        return self.base.reference(train_y, val_y)

    def step_work(self, requests: Sequence[BatchRequest], dims: int) -> float:
        # Every correction evaluates its batch at two levels, the coarsest term at one.
        finest = requests[0].level
        return mge_step_cost([r.global_batch for r in requests], dims) \
            * 2.0 ** (-dims * finest)
