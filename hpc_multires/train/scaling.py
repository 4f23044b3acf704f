"""Per-level batch and learning-rate rules: a stage's global batch and peak rate as
functions of how much smaller its inputs are than a level-0 sample (`train.batch_scale`,
`batch_cap`, `lr_scale`, `lr_scale_warmup_steps`).

A level-k sample of d axes has 2^(d k) times fewer points than a level-0 one, so at a
fixed global batch a coarse step does 1/2^(d k) of the work while its fixed costs (the
gradient allreduce, the stop vote, Python) stay. Scaling the batch by that factor keeps
the points per step, and a coarse epoch takes that many times fewer, fuller steps. The
rate follows the batch by the square-root rule (the gradient noise of a step stays) or the
linear one (the distance moved per sample stays), optionally warmed up to.

Pure functions of the config and the data's shape: the plan (`hpc-multires plan`) and
the trainer see the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from hpc_multires.train.config import TrainConfig


@dataclass(frozen=True)
class LevelScale:
    """What the rules give one stage."""

    batch: int
    """The stage's global batch."""
    lr: float
    """Its peak learning rate."""
    batch_factor: float
    """batch / train.global_batch (1: not scaled)."""
    lr_factor: float
    """lr / train.lr (1: not scaled)."""
    capped: bool
    """train.batch_cap held the batch below the data's factor."""

    @property
    def scaled(self) -> bool:
        return self.batch_factor != 1 or self.lr_factor != 1


def data_factor(level0_points: int, input_points: int) -> int:
    """How many of the stage's inputs hold the points of one level-0 sample (2^(d k) at level
    k; at least 1)."""
    return max(1, level0_points // max(1, input_points))


def level_scale(train: TrainConfig, factor: int) -> LevelScale:
    """The global batch and peak rate of a stage whose inputs are `factor` times smaller
    than a level-0 sample (`data_factor`), by its rules."""
    base = train.global_batch
    if train.batch_scale == "none" or factor <= 1:
        return LevelScale(base, train.lr, 1.0, 1.0, False)
    want = base * factor
    batch = min(want, train.batch_cap) if train.batch_cap else want
    grown = batch / base
    lr_factor = {"none": 1.0, "sqrt": math.sqrt(grown), "linear": grown}[train.lr_scale]
    return LevelScale(batch, train.lr * lr_factor, grown, lr_factor, batch < want)


def scaled_train(train: TrainConfig, scale: LevelScale) -> TrainConfig:
    """The stage's training settings with the rules applied: its global batch and peak rate
    as `scale` says (the trainer's; the config keeps the base values)."""
    return replace(train, global_batch=scale.batch, lr=scale.lr)


def warmup_factor(train: TrainConfig, lr_factor: float, step: int) -> float:
    """What multiplies the (scaled) schedule's rate at `step` of a stage whose rate the
    rules raised by `lr_factor`: rising linearly from 1 / lr_factor (the unscaled rate) at
    step 0 to 1 at step `lr_scale_warmup_steps`; 1 for an unscaled stage."""
    n = train.lr_scale_warmup_steps
    if lr_factor == 1.0 or step >= n:
        return 1.0
    start = 1.0 / lr_factor
    return start + (1.0 - start) * step / n
