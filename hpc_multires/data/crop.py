"""Windows of samples for stages that train on sub-volumes (a stage's `crop`).

A window keeps the sample's resolution and sees part of it: at a fraction of a whole
sample's cost per step it shows the grid-scale detail that pyramid levels average away.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch


def window_starts(spatial: Sequence[int], size: int, count: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Where `count` windows of `size` points per axis start in samples of `spatial` size,
    each drawn on its own: (count, len(spatial)) ints."""
    return np.stack([rng.integers(0, n - size + 1, size=count) for n in spatial], axis=1)


def region(starts: Sequence[int], size: int | Sequence[int]) -> tuple[slice, ...]:
    """The spatial slices of one window: `size` points along every axis, or size[k] along
    axis k."""
    sizes = [size] * len(starts) if isinstance(size, int) else list(size)
    return tuple(slice(int(a), int(a) + int(n)) for a, n in zip(starts, sizes, strict=True))


def tiles(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The disjoint windows of `size` points per axis that tile each sample of `x` (b, C,
    *spatial), from the origin (a remainder of an axis not divisible by `size` is left
    out); each (b, C, size, ...)."""
    per_axis = [range(0, n - size + 1, size) for n in x.shape[2:]]
    return [x[(slice(None), slice(None), *(slice(o, o + size) for o in origin))]
            for origin in itertools.product(*per_axis)]


def window_rng(seed: int, stage: str, epoch: int, step: int, rank: int) -> np.random.Generator:
    """The window places of one step: fixed by the run's seed, the stage, the step and the
    rank, so a resumed stage takes the windows it would have taken."""
    key = [seed, epoch, step, rank, *stage.encode()]
    return np.random.default_rng(np.random.SeedSequence(key))
