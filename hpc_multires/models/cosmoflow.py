"""The CosmoFlow network (MLPerf HPC): 3D conv blocks, dense layers, a scaled tanh output.

Each conv block is Conv3d -> LeakyReLU -> MaxPool3d(2) (or average pooling, and in a
level-consistent network wider pooling windows and dilated kernels; see
`hpc_multires.models.scale`; or a mesh-free convolution instead of Conv3d, `conv.py`),
with the number of filters doubling from block to block.
The head is either the original flatten + dense layers, or global average pooling (which
makes the dense layers independent of the input size, useful when one model sees several
resolutions). The output is tanh scaled by 1.2, so
labels in [-1, 1] are reachable without saturating.

With the gap head the network takes any input size (pooling a 1-voxel map keeps it), so
one set of weights serves every level of a data pyramid; with the flatten head the first
dense layer's size depends on the input size (see `dense_input_shapes`).

With width 1 and depth 5 on 128^3 x 4 inputs this is the full-size model (about 9 M
parameters, 36 MB of float32 gradients); width 0.25 and depth 4 trains on a CPU at 32^3.
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
    PaddedConv3d,
    dense_head,
    feature_pool,
    flat_dense_shapes,
    grid_conv,
    grid_pool,
    run_features,
)


class CosmoFlow(nn.Module):
    def __init__(self, *, in_channels: int, spatial: tuple[int, ...], num_outputs: int,
                 width: float = 1.0, depth: int = 5, kernel_size: int = 3,
                 head: Literal["flatten", "gap"] = "flatten",
                 fc_sizes: tuple[int, ...] = (128, 64), dropout: float = 0.0,
                 pools: list[int] | None = None, stem_stride: int = 1,
                 stem_detail: bool = False, pool_type: Literal["max", "avg"] = "max",
                 grid_factor: int = 1, norm: Literal["none", "batch"] = "none",
                 conv: ConvKind = "standard") -> None:
        super().__init__()
        pools = [2] * depth if pools is None else list(pools)  # per block; 1 = no pooling
        shrink = math.prod(pools) * stem_stride
        if kernel_size % 2 == 0:
            raise ConfigError(f"model.kernel_size = {kernel_size}: CosmoFlow keeps sizes with "
                              "padding kernel_size // 2, which needs an odd kernel such as 3")
        if conv == "meshfree" and (stem_stride > 1 or grid_factor > 1):
            raise ConfigError("model.conv = 'meshfree' runs at every level's own spacing: "
                              "use it without model.stem_level and model.kernel_level")
        smallest = min(spatial)
        if head == "flatten" and smallest // shrink < 1:
            raise ConfigError(
                f"model.depth = {depth} halves each axis {depth} times, but the samples are "
                f"only {smallest} voxels wide; use model.depth <= {int(math.log2(smallest))}, "
                "larger samples, or model.head = 'gap' (which takes any size)")
        base = max(1, round(32 * width))
        blocks: list[nn.Module] = []
        channels = in_channels
        f, half = grid_factor, kernel_size // 2
        self.level_factor = f
        for i in range(depth):
            out = base * 2**i
            # A mesh-free stem (stem_stride s > 1) samples a kernel of kernel_size taps on a
            # grid s times coarser: s * kernel_size taps here, applied every s voxels.
            s = stem_stride if i == 0 else 1
            # step: this block's input spacing in input spacings (a mesh-free layer's scale)
            step = math.prod(pools[:i]) * (stem_stride if i > 0 else 1)
            layer = conv_layer(3, conv, channels, out, kernel_size * s, stride=s,
                               padding=s * half, step=step)
            if f > 1:  # level-consistent: see grid_conv
                taps, dilation, pad = grid_conv(kernel_size, f, first=i == 0)
                layer = (nn.Conv3d(channels, out, taps, dilation=dilation, padding=pad[0])
                         if pad[0] == pad[1] else  # the even first kernel pads unevenly
                         PaddedConv3d(channels, out, taps, pad))
            blocks += [layer, *([nn.BatchNorm3d(out)] if norm == "batch" else []),
                       nn.LeakyReLU(0.3),
                       # gap head, ceil_mode: a 1-voxel map stays 1 voxel, so the same
                       # network runs on every pyramid level, however coarse. The flatten
                       # head floors, as its dense layer's size (spatial // shrink) and
                       # `prolong` (fine // 2 = coarse positions) assume: with ceil_mode an
                       # odd map (48^3 at depth 5: 48 .. 3 -> 2, not 1) broke the forward.
                       grid_pool(3, pool_type, pools[i], f, ceil_mode=head == "gap")]
            if i == 0:
                self.detail = (DetailBranch(
                    nn.Conv3d(channels, out, kernel_size, padding=kernel_size // 2),
                    nn.Identity(), nn.MaxPool3d(s), out, 0.3)
                    if stem_detail and s > 1 else None)
            channels = out
        self.features = nn.Sequential(*blocks)
        self.head_kind = head
        self.pool, self._flat_shape, features = feature_pool(
            head, channels, tuple(s // shrink for s in spatial), nn.AdaptiveAvgPool3d(1))
        self.head = dense_head(features, fc_sizes, dropout, num_outputs, lambda: nn.LeakyReLU(0.3))

    def dense_input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Dense weights that read flattened spatial features, with that input's (C, *S).

        These are the layers whose size depends on the input resolution; the `prolong`
        fusion operator needs their shapes.
        """
        return flat_dense_shapes(self.head, self._flat_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, D, H, W) -> (B, num_outputs) in (-1.2, 1.2)
        # features[:1] is the stem's convolution
        h = self.pool(run_features(self.features, self.detail, 1, x))
        # h: (B, C', d, h, w) or (B, C', 1, 1, 1)
        return 1.2 * torch.tanh(self.head(h))
