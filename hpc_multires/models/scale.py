"""How a network runs on pyramid levels: pooling factors and the mesh-free stem.

A level-L sample is the level-0 sample averaged over 2^L points per axis. A network
whose blocks pool by ``pool`` each can run on it unchanged (its feature maps are then 2^L
times smaller at every depth) or with its first poolings reduced by 2^L in all, so that
from there on every layer sees the map size, and the physical scale per map point, that
it sees at level 0. The second way makes a coarse model's layers the level-0 model's
layers: weights move between levels without any resampling.

A mesh-free stem goes one step further: the first convolution is defined on the grid of a
coarse level R and resampled on finer ones (`grid_factor`), so that the whole network,
first layer included, computes the same function of a sample at every level up to R;
`DetailBranch` gives it a full-resolution companion for what only finer levels show.

A level-consistent network (`grid_factor`, `grid_conv`, `grid_pool`) keeps every map at its level's
size instead, so a level costs what its samples hold, and defines its kernels and
pooling windows on the grid of level R: on a finer level L, f = 2^(R-L), the first
convolution spans f times the taps per axis, the later ones are dilated by f, and each
pooling window spans f * (pool - 1) + 1 points at the unchanged stride. A level-R model
moved there by `prolong` computes at every f-th map point what it computed on level R
(exactly up to the first pooling, then up to the points between them that the wider
pooling windows also read).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from hpc_multires.errors import ConfigError


def block_pools(pool: int, depth: int, level: int, mode: str, stem_level: int = 0) -> list[int]:
    """Pooling factor of each of `depth` blocks at pyramid `level` (1 = no pooling).

    mode "keep": every block pools by `pool`. mode "drop": the factor 2^level is taken
    out of the blocks' poolings from the first block on, e.g. pool 4, level 1 ->
    [2, 4, 4]; pool 2, level 2 -> [1, 1, 2, ...]. With a mesh-free stem defined on level
    R = `stem_level` (see `grid_factor`) the factor 2^R is taken out instead, at every level.
    """
    pools = [pool] * depth
    if stem_level > 0:
        setting, level = f"model.stem_level = {stem_level}", stem_level
        fix = "a smaller model.stem_level"
    elif mode == "drop" and level > 0:
        setting = f"model.coarse_pools = 'drop' at level {level}"
        fix = "fewer pyramid levels or model.coarse_pools = 'keep'"
    else:
        return pools
    rest = 2**level
    for i in range(depth):
        common = math.gcd(pools[i], rest)
        pools[i] //= common
        rest //= common
    if rest > 1:
        raise ConfigError(
            f"{setting} must take a factor {2**level} out of the poolings, but {depth} "
            f"blocks pooling by {pool} do not hold it; use {fix}")
    return pools


def grid_factor(level: int, grid_level: int) -> int:
    """How many points of the level-`level` grid one point of the level-`grid_level` grid
    spans per axis: 2^(grid_level - level) on finer levels, 1 on that level and coarser ones.

    For a mesh-free stem defined on level R (model.stem_level) it is the stem's stride and
    kernel multiple: a kernel of K taps on the level-R grid covers K * 2^(R-L) points of the
    level-L grid; sampled there with each tap repeated 2^(R-L) times per axis and divided by
    the number of repeats, and applied with that stride, it computes on a level-L sample
    exactly what it computes on the same sample averaged down to level R. For a
    level-consistent network defined on level R (model.kernel_level) it is the factor f of
    `grid_conv` and `grid_pool`; on level R and coarser the network is the plain one.
    """
    return 2 ** max(0, grid_level - level)


def grid_conv(kernel_size: int, factor: int, first: bool) -> tuple[int, int, tuple[int, int]]:
    """Taps, dilation and (left, right) zero padding of a convolution of `kernel_size` taps
    in a level-consistent network on a level `factor` times finer than its grid, padded so
    the map keeps its length. The first convolution has factor times the taps (each coarse
    tap repeated, see `prolong_kernel`); the later ones keep theirs, dilated by factor, so
    at every factor-th map point they read only points that hold the coarse values. With
    factor 1 this is the plain convolution."""
    left = factor * ((kernel_size - 1) // 2)
    if first:
        return kernel_size * factor, 1, (left, factor * kernel_size - 1 - left)
    return kernel_size, factor, (left, factor * (kernel_size - 1) - left)


class EndPad(nn.Module):
    """Pads each spatial axis at its end by repeating its last value: by `extra` points,
    and to at least `window` points (a map smaller than one pooling window)."""

    def __init__(self, extra: int, window: int) -> None:
        super().__init__()
        self.extra, self.window = extra, window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad: list[int] = []
        for size in reversed(x.shape[2:]):  # F.pad lists the last axis first
            pad += [0, max(self.extra, self.window - size)]
        return nn.functional.pad(x, pad, mode="replicate")


def grid_pool(dims: int, kind: str, pool: int, factor: int, ceil_mode: bool) -> nn.Module:
    """The pooling of a conv block (max or avg by `pool` per axis; 1 = none), with its
    window widened to factor * (pool - 1) + 1 points at the same stride for a
    level-consistent network on a level `factor` times finer than its own grid. The end
    padding keeps the output the size the plain pooling gives."""
    if pool <= 1:
        return nn.Identity()
    window = factor * (pool - 1) + 1
    layer = {("max", 1): nn.MaxPool1d, ("avg", 1): nn.AvgPool1d,
             ("max", 2): nn.MaxPool2d, ("avg", 2): nn.AvgPool2d,
             ("max", 3): nn.MaxPool3d, ("avg", 3): nn.AvgPool3d}[(kind, dims)]
    if factor == 1:
        return layer(pool, ceil_mode=ceil_mode)
    return nn.Sequential(EndPad(window - pool, window), layer(window, pool, ceil_mode=ceil_mode))


class PaddedConv3d(nn.Conv3d):
    """Conv3d with its own, possibly uneven, zero padding (left, right) on every axis: the
    first convolution of a level-consistent network has an even number of taps. A
    subclass, not a pad module before it, so its weights keep their names on every level."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 pad: tuple[int, int]) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, self.pad * 3))


class DetailBranch(nn.Module):
    """Full-resolution companion of a strided mesh-free stem, gated and starting at zero.

    The stem sees a finer level only through a kernel resampled from a coarser grid; what
    the coarse levels could not show (structure at the finest scales) needs filters at the
    level's own spacing. This branch is one: `conv` (kernel_size taps at stride 1, "same"
    padding), LeakyReLU, max-pooling by the stem's stride onto the stem's grid, times a
    per-channel gate. The gate starts at 0, so a model prolonged from a coarse level (which
    has no branch) computes exactly what the coarse model did, and training opens it.
    """

    def __init__(self, conv: nn.Module, pad: nn.Module, pool: nn.Module, channels: int,
                 slope: float) -> None:
        super().__init__()
        self.pad = pad
        self.conv = conv
        self.act = nn.LeakyReLU(slope)
        self.pool = pool
        self.gate = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: the block's input (B, C, *S) -> (B, C', *S / stride), added to the stem's output
        h = self.pool(self.act(self.conv(self.pad(x))))
        return h * self.gate.view(1, -1, *([1] * (h.dim() - 2)))


def run_features(features: nn.Sequential, detail: DetailBranch | None, stem_end: int,
                 x: torch.Tensor) -> torch.Tensor:
    """The conv blocks on `x`, with the detail branch (if any) added to the output of the
    stem's convolution, which is `features[:stem_end]`."""
    if detail is None:
        return features(x)
    return features[stem_end:](features[:stem_end](x) + detail(x))


def feature_pool(head: str, channels: int, flat_spatial: tuple[int, ...],
                 gap: nn.Module) -> tuple[nn.Module, tuple[int, ...] | None, int]:
    """How the conv features reach the dense head: "gap" averages each channel over space
    with `gap` (one network for every level), "flatten" keeps all (channels, *flat_spatial)
    values. Returns the pooling module, the flattened (C, *S) shape (None for gap) and the
    head's input size."""
    if head == "gap":
        return gap, None, channels
    shape = (channels, *flat_spatial)
    return nn.Identity(), shape, math.prod(shape)


def dense_head(in_features: int, fc_sizes: Sequence[int], dropout: float, num_outputs: int,
               activation: Callable[[], nn.Module]) -> nn.Sequential:
    """Flatten, then (dropout,) linear and activation per hidden size, then the output layer."""
    layers: list[nn.Module] = [nn.Flatten()]
    for size in fc_sizes:
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(in_features, size), activation()]
        in_features = size
    layers.append(nn.Linear(in_features, num_outputs))
    return nn.Sequential(*layers)


def flat_dense_shapes(head: nn.Sequential,
                      flat_shape: tuple[int, ...] | None) -> dict[str, tuple[int, ...]]:
    """{state-dict name of the head's first dense weight: the (C, *S) features it reads},
    for a head over flattened features (`flat_shape`), else {}. Dropout before it moves
    its index, so it is looked up, not assumed."""
    if flat_shape is None:
        return {}
    first = next(i for i, m in enumerate(head) if isinstance(m, nn.Linear))
    return {f"head.{first}.weight": flat_shape}
