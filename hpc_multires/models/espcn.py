"""ESPCN (efficient sub-pixel CNN) for super-resolution: convolutions on the small image, a
pixel shuffle to the large one.

Three convolutions (5x5 -> tanh -> 3x3 -> tanh -> 3x3) run at the input's size; the last
one makes ``upscale^2`` maps per output channel, which `nn.PixelShuffle` interleaves into an
image ``upscale`` times larger per axis. Input (B, C, H, W), output (B, C, rH, rW): it takes
the half-size input of `hpc_multires.data.corrupt` (task "sr", sr_input "half"). Fully
convolutional, so one set of weights runs on every pyramid level. Defaults (64, 32) channels,
upscale 2: 21,284 parameters with 1 channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hpc_multires.errors import ConfigError


class ESPCN(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: int | None = None, upscale: int = 2,
                 channels: Sequence[int] = (64, 32)) -> None:
        super().__init__()
        if upscale < 2:
            raise ConfigError(f"ESPCN upscale = {upscale}: use 2 or more (the factor between "
                              "the input's and the output's size)")
        if len(channels) != 2 or min(channels) < 1:
            raise ConfigError(f"ESPCN channels = {tuple(channels)}: give the two hidden "
                              "widths, e.g. (64, 32)")
        out_channels = in_channels if out_channels is None else out_channels
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, first, 5, padding=2), nn.Tanh(),
            nn.Conv2d(first, second, 3, padding=1), nn.Tanh(),
            nn.Conv2d(second, out_channels * upscale**2, 3, padding=1))
        self.shuffle = nn.PixelShuffle(upscale)
        self.upscale = upscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W) -> features (B, C_out r^2, H, W) -> (B, C_out, rH, rW)
        return self.shuffle(self.features(x))
