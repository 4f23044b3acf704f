"""UNet for image-to-image restoration: an encoder that halves the image, a decoder that
brings it back, skip connections between equal sizes.

Each encoder stage is two 3x3 convolutions with GroupNorm and SiLU, then average pooling by
2 (except the last); stage i has ``base_channels * multipliers[i]`` channels (32 x (1, 2, 4)
by default). Each decoder stage upsamples by a 2x2 transposed convolution, concatenates the
encoder's feature map of the same size, and applies two convolutions; a 1x1 convolution maps
to the output channels. The network is fully convolutional and GroupNorm normalises each
sample over its own pixels, so one set of weights runs on every pyramid level, provided each
side of the image is divisible by ``2^(len(multipliers) - 1)``.

At the defaults (32 x (1, 2, 4)) with 1 input and 1 output channel: 467,233 parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hpc_multires.errors import ConfigError


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # A group count that divides the channels: tiny test networks have few channels.
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ConvBlock(nn.Sequential):
    """(conv 3x3 -> GroupNorm -> SiLU) x 2, keeping the size."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), _norm(out_channels, groups),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1), _norm(out_channels, groups),
            nn.SiLU())


def output_channels(net: str, in_channels: int, out_channels: int | None,
                    residual: bool) -> int:
    """The channels a restoration network outputs (None: its input's). A residual one adds
    its input to its output, so it needs as many."""
    out = in_channels if out_channels is None else out_channels
    if residual and out != in_channels:
        raise ConfigError(f"a residual {net} adds its input to its output: it needs as many "
                          f"output channels as input channels, not {out} for {in_channels}")
    return out


def start_at_zero(layer: nn.Module) -> None:
    """A residual network's last layer starts at 0: the untrained network changes nothing
    (it learns the correction of its input)."""
    for param in layer.parameters():
        nn.init.zeros_(param)


def unet_size_error(spatial: Sequence[int], multipliers: Sequence[int]) -> ConfigError | None:
    """The error for images a UNet with `multipliers` cannot take, or None if it can."""
    halvings = len(multipliers) - 1
    if all(s % 2**halvings == 0 for s in spatial):
        return None
    # The most multipliers these sides allow: one more than the 2s they share.
    fits = 1 + min((s & -s).bit_length() - 1 for s in spatial)
    size = "x".join(str(s) for s in spatial)
    return ConfigError(
        f"a UNet with {len(multipliers)} multipliers {tuple(multipliers)} halves the image "
        f"{halvings} times and needs sides divisible by {2**halvings}, but the images here are "
        f"{size}; use at most {fits} multipliers (e.g. {tuple(multipliers[:fits])}), or "
        "images (a coarsest level) whose sides it divides")


class UNet(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: int | None = None,
                 base_channels: int = 32, multipliers: Sequence[int] = (1, 2, 4),
                 groups: int = 8, spatial: Sequence[int] | None = None,
                 residual: bool = False) -> None:
        """`spatial`: the (H, W) of the smallest images the network will see (its coarsest
        level), checked here so that a depth they cannot take fails before training.
        `residual`: add the input to the output, so the network learns the correction of
        its input (as many output channels as input channels); its last convolution starts
        at 0, so the untrained network returns its input."""
        super().__init__()
        if not multipliers or min(multipliers) < 1 or base_channels < 1:
            raise ConfigError(f"UNet base_channels = {base_channels}, multipliers = "
                              f"{tuple(multipliers)}: use base_channels >= 1 and one or more "
                              "multipliers >= 1, e.g. (1, 2, 4)")
        self.multipliers = tuple(multipliers)
        if spatial is not None and (error := unet_size_error(spatial, self.multipliers)):
            raise error
        out_channels = output_channels("UNet", in_channels, out_channels, residual)
        self.residual = residual
        widths = [base_channels * m for m in self.multipliers]
        self.encoder = nn.ModuleList()
        channels = in_channels
        for width in widths:
            self.encoder.append(ConvBlock(channels, width, groups))
            channels = width
        self.down = nn.AvgPool2d(2)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(channels, width, 2, stride=2))
            self.decoder.append(ConvBlock(2 * width, width, groups))
            channels = width
        self.head = nn.Conv2d(channels, out_channels, 1)
        if residual:
            start_at_zero(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H, W)
        if error := unet_size_error(x.shape[2:], self.multipliers):
            raise error
        skips = []
        h = x
        for i, block in enumerate(self.encoder):
            h = block(h)  # (B, base * m_i, H / 2^i, W / 2^i)
            if i < len(self.encoder) - 1:
                skips.append(h)
                h = self.down(h)
        for up, block in zip(self.up, self.decoder, strict=True):
            h = block(torch.cat([up(h), skips.pop()], dim=1))
        return x + self.head(h) if self.residual else self.head(h)
