"""The Neuron Inverter network: 1D conv blocks over voltage traces, dense layers, a tanh output.

Each conv block is Conv1d -> LeakyReLU -> MaxPool1d(pool) (or average pooling, and in a
level-consistent network wider pooling windows and dilated kernels; see
`hpc_multires.models.scale`; or a mesh-free convolution instead of Conv1d, `conv.py`),
three blocks with (30, 90, 180) filters by default, scaled by ``width``. Convolutions keep
the length ("same" padding), so only the pooling shortens the trace: 1,600 bins become
1600 // 4**3 = 25. The head is either the reference's flatten + dense layers (512, 256,
128, ReLU), whose first layer is sized for one input length, or global average pooling,
which makes the dense layers independent of the length (useful when one model sees
several time resolutions). The output is tanh scaled by 1.2, as in CosmoFlow, so labels in
[-1, 1] are reachable without saturating.

At the defaults on 4 probes x 1,600 bins with 6 outputs the model has 2,545,890 parameters,
90% of them in the first dense layer (4,500 -> 512).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from hpc_multires.errors import ConfigError
from hpc_multires.models.conv import ConvKind, conv_layer
from hpc_multires.models.scale import (
    DetailBranch,
    dense_head,
    feature_pool,
    flat_dense_shapes,
    grid_conv,
    grid_pool,
    run_features,
)


class NeuronInverter(nn.Module):
    """1D CNN regressing ``num_outputs`` labels in [-1, 1] from (B, in_channels, length) traces.

    ``conv_channels`` gives the filters of each conv block (one block per entry), multiplied by
    ``width`` and rounded (at least 1). ``kernel_size`` is the convolution length in bins and
    ``pool`` the pooling factor of every block (``pool_type`` max, as the reference, or avg).
    ``grid_factor`` f > 1 makes it the level-consistent network of a grid f times coarser
    (`hpc_multires.models.scale`): f * kernel_size taps in the first convolution, the later
    ones dilated by f, pooling windows of f * (pool - 1) + 1 bins. ``fc_sizes`` are the
    hidden dense layers; ``dropout`` > 0 puts a dropout layer before each of them. ``conv``
    "meshfree" makes every convolution a mesh-free one (an odd ``kernel_size``).
    """

    def __init__(self, *, in_channels: int, length: int, num_outputs: int, width: float = 1.0,
                 conv_channels: tuple[int, ...] = (30, 90, 180), kernel_size: int = 4,
                 pool: int = 4, fc_sizes: tuple[int, ...] = (512, 256, 128),
                 dropout: float = 0.0, head: Literal["flatten", "gap"] = "flatten",
                 pools: list[int] | None = None, stem_stride: int = 1,
                 stem_detail: bool = False, pool_type: Literal["max", "avg"] = "max",
                 grid_factor: int = 1, norm: Literal["none", "batch"] = "none",
                 conv: ConvKind = "standard") -> None:
        super().__init__()
        if conv == "meshfree" and (kernel_size % 2 == 0 or stem_stride > 1 or grid_factor > 1):
            raise ConfigError(f"model.conv = 'meshfree' needs an odd model.kernel_size (not "
                              f"{kernel_size}) and runs at every level's own spacing: use it "
                              "without model.stem_level and model.kernel_level")
        if pool < 1 or kernel_size < 1 or length < 1:
            raise ConfigError(f"model.pool = {pool}, model.kernel_size = {kernel_size} and the "
                              f"sample length {length} must all be >= 1")
        if head not in ("flatten", "gap"):
            raise ConfigError(f"model.head = {head!r}: use 'flatten' or 'gap'")
        depth = len(conv_channels)
        pools = [pool] * depth if pools is None else list(pools)  # per block; 1 = no pooling
        shrink = math.prod(pools) * stem_stride  # what the blocks take out of the length
        reduced = length // shrink
        if reduced < 1:
            # The largest length-compatible depth tells the user which knob to turn. Counted
            # over the blocks' own poolings (fewer at a coarse level with coarse_pools =
            # "drop" or stem_level), never past the depth: a loop on `pool` alone never
            # ended for pool = 1.
            fits = 0
            while fits < depth and length // (stem_stride * math.prod(pools[:fits + 1])) >= 1:
                fits += 1
            raise ConfigError(
                f"{depth} conv blocks pool the trace by {shrink} in all, but the samples are "
                f"only {length} bins long; use at least {shrink} bins (a milder time "
                f"downsampling), a smaller model.pool, or at most {fits} conv blocks")
        blocks: list[nn.Module] = []
        channels = in_channels
        f, left = grid_factor, (kernel_size - 1) // 2
        self.level_factor = f
        for i, (filters, factor) in enumerate(zip(conv_channels, pools, strict=True)):
            out = max(1, round(filters * width))
            # A mesh-free stem (stem_stride s > 1): a kernel of kernel_size taps on a grid
            # s times coarser, i.e. s * kernel_size taps here applied every s bins.
            s = stem_stride if i == 0 else 1
            # "Same" padding keeps the length a function of the pooling alone, so the length
            # check above is exact. Done by an explicit pad because Conv1d(padding="same")
            # warns and copies the input for the default even kernel.
            pad: tuple[int, int] = (s * left, s * (kernel_size // 2))
            # step: this block's input spacing in input spacings (a mesh-free layer's scale);
            # a mesh-free layer pads itself ("same"), the pad module then pads nothing
            step = math.prod(pools[:i]) * (stem_stride if i > 0 else 1)
            layer = conv_layer(1, conv, channels, out, kernel_size * s, stride=s,
                               padding=0 if conv == "standard" else left, step=step)
            if conv == "meshfree":
                pad = (0, 0)
            if f > 1:  # level-consistent: see grid_conv
                taps, dilation, pad = grid_conv(kernel_size, f, first=i == 0)
                layer = nn.Conv1d(channels, out, taps, dilation=dilation)
            blocks += [nn.ConstantPad1d(pad, 0.0), layer,
                       *([nn.BatchNorm1d(out)] if norm == "batch" else []), nn.LeakyReLU(0.01),
                       grid_pool(1, pool_type, factor, f, ceil_mode=False)]
            if i == 0:
                self.detail = (DetailBranch(
                    nn.Conv1d(channels, out, kernel_size),
                    nn.ConstantPad1d(((kernel_size - 1) // 2, kernel_size // 2), 0.0),
                    nn.MaxPool1d(s), out, 0.01)
                    if stem_detail and s > 1 else None)
            channels = out
        self.features = nn.Sequential(*blocks)
        self.head_kind = head
        self.pool, self._flat_shape, features = feature_pool(
            head, channels, (reduced,), nn.AdaptiveAvgPool1d(1))
        self.head = dense_head(features, fc_sizes, dropout, num_outputs, nn.ReLU)

    def dense_input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Dense weights that read flattened time features, with that input's (C, T')."""
        return flat_dense_shapes(self.head, self._flat_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T) -> (B, num_outputs) in (-1.2, 1.2)
        # features[:2] is the stem's convolution
        h = self.pool(run_features(self.features, self.detail, 2, x))
        # h: (B, C', T // pool**depth) or (B, C', 1)
        return 1.2 * torch.tanh(self.head(h))
