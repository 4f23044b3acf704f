"""Residual CNN for image-to-image restoration, at the image's own size throughout.

A 3x3 convolution lifts the input to ``channels`` feature maps, ``blocks`` residual blocks
(pre-activation: norm -> SiLU -> conv 3x3, twice, added to the block's input) transform
them, and a 3x3 convolution maps to the output channels. There is no pooling, so any image
size works and one set of weights runs on every pyramid level. Defaults: 128 channels, 2
blocks (593,793 parameters with GroupNorm, 1 input and 1 output channel); tests use a few
channels.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from hpc_multires.errors import ConfigError
from hpc_multires.models.unet import output_channels, start_at_zero


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, kernel_size: int, norm: Literal["group", "none"],
                 groups: int) -> None:
        super().__init__()

        def norm_layer() -> nn.Module:
            return (nn.GroupNorm(math.gcd(groups, channels), channels) if norm == "group"
                    else nn.Identity())

        pad = kernel_size // 2
        self.body = nn.Sequential(
            norm_layer(), nn.SiLU(), nn.Conv2d(channels, channels, kernel_size, padding=pad),
            norm_layer(), nn.SiLU(), nn.Conv2d(channels, channels, kernel_size, padding=pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet2d(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: int | None = None,
                 channels: int = 128, blocks: int = 2, kernel_size: int = 3,
                 norm: Literal["group", "none"] = "group", groups: int = 8,
                 residual: bool = False) -> None:
        """`residual`: add the input to the output, so the network learns the correction of
        its input (as many output channels as input channels); its last convolution starts
        at 0, so the untrained network returns its input."""
        super().__init__()
        if kernel_size % 2 == 0:
            raise ConfigError(f"ResNet2d kernel_size = {kernel_size}: use an odd kernel such as "
                              "3, which keeps the image size with padding kernel_size // 2")
        if norm not in ("group", "none"):
            raise ConfigError(f"ResNet2d norm = {norm!r}: use 'group' or 'none'")
        if channels < 1 or blocks < 0:
            raise ConfigError(f"ResNet2d channels = {channels}, blocks = {blocks}: use "
                              "channels >= 1 and blocks >= 0")
        out_channels = output_channels("ResNet2d", in_channels, out_channels, residual)
        self.residual = residual
        pad = kernel_size // 2
        self.stem = nn.Conv2d(in_channels, channels, kernel_size, padding=pad)
        self.blocks = nn.Sequential(*(ResidualBlock(channels, kernel_size, norm, groups)
                                      for _ in range(blocks)))
        last = nn.Conv2d(channels, out_channels, kernel_size, padding=pad)
        if residual:
            start_at_zero(last)
        self.head = nn.Sequential(nn.SiLU(), last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H, W)
        out = self.head(self.blocks(self.stem(x)))
        return x + out if self.residual else out
