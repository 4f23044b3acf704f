"""Dynamic downsampling as an objective: a batch mixer around the stage's own objective.

`Downsampling(inner, settings, seed, total_steps)` computes `inner`'s loss, on the steps
that `downsample_decision(seed, step, ...)` picks on this step's index alone with the
batches averaged down by the factor (`restrict_input`) and the model's kernels pooled to
match (`downsampled`). What the step reads, the validation and the reference scores are
`inner`'s: validation stays at the stage's full resolution. `inner` may be any objective
the stage's task picks (Regression, Restoration); an image target is restricted with its
input. MGE (which reads coarser levels by its own) is refused with it by the config check.

The decision has no state and no collective: every rank of a stage decides the same for
the same step (same seed, same step index), and a resumed stage repeats the straight
run's decisions. The model the loop passes is the DDP wrapper on several ranks; the
kernels are parametrised on the module inside it, whose parameter objects DDP (or
Horovod's optimizer) holds, so the coarse step's gradients are averaged like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpc_multires.data.loader import ReadCorruption
from hpc_multires.methods.downsample import downsample_decision, downsampled, restrict_input
from hpc_multires.train.config import DownsampleConfig
from hpc_multires.train.objective import Batch, BatchRequest, Objective, StepLoss, Validation


def inner_module(model: nn.Module) -> nn.Module:
    """The network itself: the module a DDP wrapper holds, or `model` as it is."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class Downsampling(Objective):
    """`inner`'s objective, with a `settings.fraction` share of the steps downsampled.

    `total_steps`: the stage's steps (epochs x steps per epoch), which the "decay" schedule
    spreads its share over. Each step logs `downsampled` (1 or 0; averaged over the stage's
    ranks on log steps, so anything but 0 or 1 there would mean ranks disagreed)."""

    def __init__(self, inner: Objective, settings: DownsampleConfig, seed: int,
                 total_steps: int) -> None:
        self.inner = inner
        self.settings = settings
        self.seed = seed
        self.total_steps = max(1, total_steps)
        self.headline = inner.headline
        self.higher_is_better = inner.higher_is_better

    def coarse(self, step: int) -> bool:
        """Whether stage step `step` (from 0) trains on downsampled inputs."""
        s = self.settings
        return downsample_decision(self.seed, step, self.total_steps, s.fraction, s.schedule,
                                   s.every or None)

    def requests(self, level: int, global_batch: int) -> list[BatchRequest]:
        return self.inner.requests(level, global_batch)

    def loss(self, model: nn.Module, batches: Sequence[Batch], step: int) -> StepLoss:
        if not self.coarse(step):
            out = self.inner.loss(model, batches, step)
            flag = 0.0
        else:
            factor = self.settings.factor
            # (b, C, *S) -> (b, C, *S / factor), as the pyramid averages a level; an image
            # target (the image tasks' clean image) is restricted with its input
            coarse = [replace(b, x=restrict_input(b.x, factor),
                              y=restrict_input(b.y, factor) if b.y.dim() == b.x.dim() else b.y)
                      for b in batches]
            # The pooled kernels are a differentiable function of the full-size ones: the
            # graph built in here still reaches them when the loop calls backward outside.
            with downsampled(inner_module(model), factor, self.settings.kernel_pool):
                out = self.inner.loss(model, coarse, step)
            flag = 1.0
        marker = torch.tensor(flag, device=out.loss.device)
        return StepLoss(out.loss, {**out.logged, "downsampled": marker})

    def criterion(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.inner.criterion(prediction, target)

    def corruption(self, epoch: int | None) -> ReadCorruption | None:
        return self.inner.corruption(epoch)

    def step_work(self, requests: Sequence[BatchRequest], dims: int) -> float:
        # What the inner objective's step costs; a downsampled step costs less, which the
        # plan's cost model counts (plan/cost.py, downsample_work), not the start record.
        return self.inner.step_work(requests, dims)

    def validation(self, label_names: Sequence[str], crop: int) -> Validation:
        return self.inner.validation(label_names, crop)

    def reference(self, train_y: np.ndarray, val_y: np.ndarray) -> dict[str, float]:
        return self.inner.reference(train_y, val_y)
