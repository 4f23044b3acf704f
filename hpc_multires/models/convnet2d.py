"""A small 2D classification CNN: conv blocks, then a dense head that outputs class logits.

Each conv block is Conv2d -> (BatchNorm) -> ReLU -> pooling by 2 (max or avg), with
round(16 * width) filters in the first block, doubling per block. The head is global
average pooling ("gap": one set of weights for any input size, so the same network runs
on every pyramid level, on windows and on sub-images) or the flattened features
("flatten": the first dense layer's size depends on the input size, see
`dense_input_shapes`), then the hidden dense layers of `fc_sizes` and a linear layer to
`num_outputs`. No final activation: for task.kind = "classify" the outputs are logits (the
softmax is in the loss); for a regression, unbounded values.

With the gap head, pooling keeps a 1-pixel map one pixel (ceil mode), so inputs smaller
than 2^depth run too. At width 1, depth 4 and fc_sizes (64,) it has about 0.1 M
parameters; on 64x64 grey images a forward pass costs about 30 MFLOP.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from hpc_multires.errors import ConfigError
from hpc_multires.models.scale import dense_head, feature_pool, flat_dense_shapes, grid_pool


class ConvNet2d(nn.Module):
    def __init__(self, *, in_channels: int, spatial: tuple[int, ...], num_outputs: int,
                 width: float = 1.0, depth: int = 4, kernel_size: int = 3,
                 head: Literal["flatten", "gap"] = "gap", fc_sizes: tuple[int, ...] = (64,),
                 dropout: float = 0.0, pools: list[int] | None = None,
                 pool_type: Literal["max", "avg"] = "max",
                 norm: Literal["none", "batch"] = "none") -> None:
        super().__init__()
        pools = [2] * depth if pools is None else list(pools)  # per block; 1 = no pooling
        if kernel_size % 2 == 0:
            raise ConfigError(f"model.kernel_size = {kernel_size}: convnet2d keeps sizes with "
                              "padding kernel_size // 2, which needs an odd kernel such as 3")
        shrink = math.prod(pools)
        smallest = min(spatial)
        if head == "flatten" and smallest // shrink < 1:
            raise ConfigError(
                f"model.depth = {depth} halves each side {depth} times, but the images are "
                f"only {smallest} pixels wide; use model.depth <= {int(math.log2(smallest))}, "
                "larger images, or model.head = 'gap' (which takes any size)")
        base = max(1, round(16 * width))
        blocks: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            out = base * 2**i
            blocks += [nn.Conv2d(channels, out, kernel_size, padding=kernel_size // 2),
                       *([nn.BatchNorm2d(out)] if norm == "batch" else []),
                       nn.ReLU(),
                       # gap: ceil mode keeps a 1-pixel map (any input size runs); flatten
                       # floors, as its dense layer's size (spatial // shrink) assumes.
                       grid_pool(2, pool_type, pools[i], 1, ceil_mode=head == "gap")]
            channels = out
        self.features = nn.Sequential(*blocks)
        self.pool, self._flat_shape, features = feature_pool(
            head, channels, tuple(s // shrink for s in spatial), nn.AdaptiveAvgPool2d(1))
        self.head = dense_head(features, fc_sizes, dropout, num_outputs, nn.ReLU)

    def dense_input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Dense weights that read flattened spatial features, with that input's (C, H, W)
        (the flatten head's first layer; none with gap): what `prolong` resamples."""
        return flat_dense_shapes(self.head, self._flat_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> features (B, C', h, w) or (B, C', 1, 1) -> (B, num_outputs)
        return self.head(self.pool(self.features(x)))
