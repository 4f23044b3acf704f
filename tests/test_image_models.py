"""Tests for the image-to-image networks (UNet, ResNet2d, ESPCN): shapes on every pyramid
level with one set of weights, sizes a UNet cannot take, the documented defaults."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpc_multires.errors import ConfigError
from hpc_multires.models.espcn import ESPCN
from hpc_multires.models.resnet2d import ResNet2d
from hpc_multires.models.unet import UNet, unet_size_error


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_documented_defaults() -> None:
    unet = UNet(in_channels=1)
    assert _count(unet) == 467_233
    assert [b[0].out_channels for b in unet.encoder] == [32, 64, 128]
    assert sum(isinstance(m, nn.GroupNorm) for m in unet.modules()) == 10
    resnet = ResNet2d(in_channels=1)
    assert _count(resnet) == 593_793 and resnet.stem.out_channels == 128
    assert len(resnet.blocks) == 2
    assert _count(ESPCN(in_channels=1)) == 21_284


@pytest.mark.parametrize("make", [
    lambda: UNet(in_channels=3, base_channels=4, multipliers=(1, 2, 4)),
    lambda: ResNet2d(in_channels=3, channels=4, blocks=2),
    lambda: ResNet2d(in_channels=3, channels=4, blocks=1, norm="none", kernel_size=5)],
    ids=["unet", "resnet", "resnet-plain"])
def test_one_set_of_weights_runs_on_every_level(make) -> None:
    torch.manual_seed(0)
    model = make()
    for size in (32, 16, 8, 4):
        x = torch.rand(2, 3, size, size)
        y = model(x)
        assert y.shape == x.shape and torch.isfinite(y).all()


def test_output_channels_may_differ_from_input() -> None:
    x = torch.rand(1, 4, 8, 8)
    assert UNet(in_channels=4, out_channels=1, base_channels=2)(x).shape == (1, 1, 8, 8)
    assert ResNet2d(in_channels=4, out_channels=3, channels=2)(x).shape == (1, 3, 8, 8)
    assert ESPCN(in_channels=4, out_channels=1, channels=(3, 2))(x).shape == (1, 1, 16, 16)


def test_resnet_is_shift_equivariant_away_from_the_border() -> None:
    """Fully convolutional: a shifted input gives the shifted output where padding does not
    reach (2 + 2 * blocks convolutions of radius 1)."""
    torch.manual_seed(1)
    model = ResNet2d(in_channels=1, channels=3, blocks=1, norm="none").eval()
    x = torch.rand(1, 1, 24, 24)
    shifted = torch.roll(x, shifts=(3, 5), dims=(2, 3))
    y, ys = model(x), model(shifted)
    r = 4 + 5  # receptive radius plus the shift
    torch.testing.assert_close(torch.roll(y, (3, 5), (2, 3))[..., r:-r, r:-r], ys[..., r:-r, r:-r])


def test_unet_halves_per_stage_and_concatenates_same_size_skips() -> None:
    model = UNet(in_channels=1, base_channels=4, multipliers=(1, 2, 4))
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for name, module in [*((f"enc{i}", b) for i, b in enumerate(model.encoder)),
                         *((f"dec{i}", b) for i, b in enumerate(model.decoder))]:
        module.register_forward_hook(
            lambda _m, inp, out, name=name: shapes.append((name, (*inp[0].shape[1:],
                                                                  *out.shape[1:]))))
    model(torch.rand(1, 1, 16, 16))
    # (C_in, H, W, C_out, H, W) of each block; a decoder block takes up-path + skip channels
    assert shapes == [("enc0", (1, 16, 16, 4, 16, 16)), ("enc1", (4, 8, 8, 8, 8, 8)),
                      ("enc2", (8, 4, 4, 16, 4, 4)), ("dec0", (16, 8, 8, 8, 8, 8)),
                      ("dec1", (8, 16, 16, 4, 16, 16))]


def test_espcn_interleaves_sub_pixels() -> None:
    """The last convolution's r^2 maps per channel are the r x r sub-pixel positions."""
    model = ESPCN(in_channels=1, channels=(2, 2))
    x = torch.rand(1, 1, 5, 7)
    feats = model.features(x)  # (1, 4, 5, 7)
    y = model(x)  # (1, 1, 10, 14)
    assert y.shape == (1, 1, 10, 14)
    for dy in (0, 1):
        for dx in (0, 1):
            torch.testing.assert_close(y[0, 0, dy::2, dx::2], feats[0, 2 * dy + dx])


def test_espcn_trains_end_to_end() -> None:
    """A few Adam steps cut the error against a bilinear upsample of the input."""
    torch.manual_seed(3)
    model = ESPCN(in_channels=1, channels=(8, 8))
    x = torch.rand(8, 1, 8, 8)
    target = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize(("spatial", "multipliers", "fits"), [
    ((12, 12), (1, 2, 4, 8), "use at most 3 multipliers .e.g. .1, 2, 4.."),
    ((6, 8), (1, 2, 4), "use at most 2 multipliers"),
    ((7, 16), (1, 2), "use at most 1 multipliers")])
def test_unet_depth_the_images_cannot_take_is_a_config_error_naming_the_fix(
        spatial, multipliers, fits) -> None:
    with pytest.raises(ConfigError, match=fits):
        UNet(in_channels=1, base_channels=2, multipliers=multipliers, spatial=spatial)
    model = UNet(in_channels=1, base_channels=2, multipliers=multipliers)
    with pytest.raises(ConfigError, match="needs sides divisible by"):
        model(torch.rand(1, 1, *spatial))
    assert unet_size_error((16, 32), multipliers) is None


@pytest.mark.parametrize(("make", "match"), [
    (lambda: UNet(in_channels=1, multipliers=()), "multipliers"),
    (lambda: ResNet2d(in_channels=1, kernel_size=4), "odd kernel"),
    (lambda: ResNet2d(in_channels=1, norm="batch"), "'group' or 'none'"),
    (lambda: ESPCN(in_channels=1, upscale=1), "upscale"),
    (lambda: ESPCN(in_channels=1, channels=(8,)), "two hidden widths")])
def test_bad_settings_are_config_errors(make, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()
