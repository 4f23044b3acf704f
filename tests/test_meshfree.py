"""Mesh-free convolutions: one set of parameters, the same operator on every grid."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpc_multires.errors import ConfigError
from hpc_multires.models.meshfree import (
    MeshFreeConv,
    MeshFreeConv1d,
    MeshFreeConv2d,
    MeshFreeConv3d,
    derivative_orders,
    level_spacing,
    set_spacing,
)


def _grid(n: int, dims: int) -> list[torch.Tensor]:
    """Cell-centre coordinates of an n^dims grid on the unit cube, one tensor per axis."""
    x = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return list(torch.meshgrid(*[x] * dims, indexing="ij"))


def _waves(dims: int, count: int, gen: torch.Generator) -> list[tuple[torch.Tensor, float, float]]:
    """(wave vector, amplitude, phase) of `count` plane waves with at most 3 cycles per axis."""
    waves = []
    for _ in range(count):
        k = 2 * math.pi * torch.randint(-3, 4, (dims,), generator=gen).double()
        amplitude, phase = torch.randn(2, generator=gen, dtype=torch.float64).tolist()
        waves.append((k, amplitude, phase))
    return waves


def _band_limited(n: int, channels: int, gen: torch.Generator) -> torch.Tensor:
    """A smooth random 2D field: (1, channels, n, n), sums of low-frequency plane waves."""
    x, y = _grid(n, 2)
    out = torch.zeros(1, channels, n, n, dtype=torch.float64)
    for c in range(channels):
        for k, amplitude, phase in _waves(2, 12, gen):
            out[0, c] += amplitude * torch.cos(k[0] * x + k[1] * y + phase)
    return out


@pytest.mark.parametrize("n", [40, 56, 64, 100])
def test_features_are_the_continuous_operators_at_any_spacing(n: int) -> None:
    # Not only powers of two: every grid that resolves the scale computes
    # scale^|m| d^m (G * u) of the same continuous field, checked against the exact values.
    gen = torch.Generator().manual_seed(1)
    scale = 1 / 20
    layer = MeshFreeConv(2, 1, 1, spacing=1 / n, scale=scale).double()
    x, y = _grid(n, 2)
    u = torch.zeros(n, n, dtype=torch.float64)
    exact = torch.zeros(len(layer.orders), n, n, dtype=torch.float64)
    for k, amplitude, phase in _waves(2, 8, gen):
        u += amplitude * torch.cos(k[0] * x + k[1] * y + phase)
        blur = math.exp(-0.5 * scale**2 * float(k @ k))
        for i, (mx, my) in enumerate(layer.orders):
            # d^m cos(a) = k^m cos(a + |m| pi / 2)
            exact[i] += (amplitude * blur * (scale * k[0]) ** mx * (scale * k[1]) ** my
                         * torch.cos(k[0] * x + k[1] * y + phase + (mx + my) * math.pi / 2))
    got = layer.features(u.view(1, 1, n, n))[0, 0]
    inner = slice(n // 5, n - n // 5)  # zero padding outside the map bends the edges
    for i, order in enumerate(layer.orders):
        want = exact[i, inner, inner]
        error = float((got[i, inner, inner] - want).norm() / want.norm())
        assert error < 1e-3, (order, error)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_derivatives_exact_on_quadratics(dims: int) -> None:
    # Each operator's discrete moments are exact, so on a quadratic every derivative is
    # exact however coarse the grid (0.37 here, wider than the scale).
    n, spacing = 12, 0.37
    layer = MeshFreeConv(dims, 1, 1, spacing=spacing, scale=0.3).double()
    coords = [c * n * spacing for c in _grid(n, dims)]
    a = torch.arange(1, dims + 1, dtype=torch.float64)
    u = sum(a[i] * coords[i] ** 2 + coords[i] for i in range(dims))
    u = u + (coords[0] * coords[-1] if dims > 1 else 0)
    got = layer.features(u.view(1, 1, *u.shape))[0, 0]
    inner = (slice(5, n - 5),) * dims  # the kernels reach 5 points
    for i, order in enumerate(layer.orders):
        if sum(order) == 0:
            continue
        if sum(order) == 1:
            axis = order.index(1)
            want = 0.3 * (2 * a[axis] * coords[axis] + 1)
            if dims > 1 and axis in (0, dims - 1):
                want = want + 0.3 * coords[dims - 1 - axis]
        elif max(order) == 2:
            want = 0.3**2 * 2 * a[order.index(2)] * torch.ones_like(u)
        else:
            want = torch.full_like(u, 0.3**2 if order[0] == order[-1] == 1 else 0.0)
        assert torch.allclose(got[i][inner], want[inner], atol=1e-9), order


@torch.no_grad()
def test_same_result_on_a_restricted_input() -> None:
    # The MFC on the input averaged to spacing 2h gives the average of its output on the
    # fine input; a plain 3x3 convolution, whose taps mean "one grid point", does not.
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    lines = []
    for n in (32, 64, 128):
        u = _band_limited(n, 3, gen)  # (1, 3, n, n)
        mfc = MeshFreeConv2d(3, 4, spacing=1 / n, scale=2 / n).double()
        plain = nn.Conv2d(3, 4, 3, padding=1).double()
        fine = F.avg_pool2d(mfc(u), 2)
        mfc.spacing = 2 / n
        coarse = mfc(F.avg_pool2d(u, 2))
        plain_fine, plain_coarse = F.avg_pool2d(plain(u), 2), plain(F.avg_pool2d(u, 2))
        inner = (..., slice(6, n // 2 - 6), slice(6, n // 2 - 6))

        def error(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a - b).norm() / a.norm())

        errors = (error(fine, coarse), error(plain_fine, plain_coarse),
                  error(fine[inner], coarse[inner]), error(plain_fine[inner], plain_coarse[inner]))
        lines.append(f"n={n:4d}  mfc {errors[0]:.2e} (interior {errors[2]:.1e})  "
                     f"conv3x3 {errors[1]:.2e} (interior {errors[3]:.1e})")
        # The edges are where zero padding cuts the field off; the coarse grid resolves
        # that cut less well than the smooth interior.
        assert errors[0] < 0.05 and errors[0] < errors[1] / 5
        assert errors[2] < 1e-4 and errors[3] > 0.05
    print("\nrelative error, restricted output vs output on the restricted input:\n"
          + "\n".join(lines))


def _stencils(orders: list[tuple[int, ...]], spacing: float, scale: float) -> torch.Tensor:
    """The same operators as 3x3 central differences on the grid: (operators, 3, 3)."""
    rows = (torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),
            torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64),
            torch.tensor([1.0, -2.0, 1.0], dtype=torch.float64))
    return torch.stack([torch.outer(rows[mx] * (scale / spacing) ** mx,
                                    rows[my] * (scale / spacing) ** my) for mx, my in orders])


def _gradients(u: torch.Tensor, target: torch.Tensor | None, mfc: MeshFreeConv,
               theta: torch.Tensor, stencils: torch.Tensor,
               plain: nn.Conv2d) -> list[torch.Tensor]:
    """Gradients of mean(out^2) (target None) or mean((out - target)^2) for the MFC's
    weight, theta read as 3x3 stencils, and the plain convolution's taps."""
    def loss(out: torch.Tensor) -> torch.Tensor:
        return (out**2).mean() if target is None else ((out - target) ** 2).mean()

    weight = torch.einsum("oik,kxy->oixy", theta, stencils)  # (out, in, 3, 3)
    return [torch.autograd.grad(loss(mfc(u)), mfc.weight)[0],
            torch.autograd.grad(loss(F.conv2d(u, weight, mfc.bias, padding=1)), theta)[0],
            torch.autograd.grad(loss(plain(u)), plain.weight)[0]]


def _gradient_series(clean: bool) -> dict[str, list[float]]:
    """Gradient norms on 8^2 .. 128^2 grids of the unit square, averaged over 4 draws of
    white noise (variance 1 per point), for the same parameters theta (out, in, 6) read
    three ways: the MFC; the same operators as 3x3 central differences scaled by
    (scale/h)^|m| (a standard convolution whose taps are set by physical coefficients);
    and a plain 3x3 convolution's own taps. clean = False: loss mean(out^2) on pure noise.
    clean = True: the distance between the gradients of mean((out - target)^2) on a smooth
    field with and without the noise."""
    scale = 1 / 16
    torch.manual_seed(0)
    mfc = MeshFreeConv2d(2, 2, scale=scale).double()
    theta = mfc.weight.detach().clone().requires_grad_(True)
    plain = nn.Conv2d(2, 2, 3, padding=1).double()
    series: dict[str, list[float]] = {"mfc": [], "3x3 physical": [], "3x3 taps": []}
    gen = torch.Generator().manual_seed(3)
    smooth_field = _band_limited(128, 2, gen)  # the same smooth field, sampled on each grid
    for n in (8, 16, 32, 64, 128):
        mfc.spacing = 1 / n
        stencils = _stencils(mfc.orders, 1 / n, scale)
        field = F.avg_pool2d(smooth_field, 128 // n)  # (1, 2, n, n)
        target = field.flip(1).tanh() if clean else None
        base = _gradients(field, target, mfc, theta, stencils, plain) if clean else None
        total = [0.0, 0.0, 0.0]
        draws = 4
        for _ in range(draws):
            noise = torch.randn(1, 2, n, n, generator=gen, dtype=torch.float64)
            u = field + noise if clean else noise
            for i, g in enumerate(_gradients(u, target, mfc, theta, stencils, plain)):
                total[i] += float((g - base[i]).norm() if base is not None else g.norm())
        for name, value in zip(series, total, strict=True):
            series[name].append(value / draws)
    return series


def _print_series(title: str, series: dict[str, list[float]]) -> None:
    print(f"\n{title} (grids 8, 16, 32, 64, 128 per axis):")
    for name, values in series.items():
        print(f"  {name:13s} " + " ".join(f"{v:9.3e}" for v in values)
              + f"   last/first {values[-1] / values[0]:.3g}")


def test_gradient_on_white_noise_stays_bounded_under_refinement() -> None:
    series = _gradient_series(clean=False)
    _print_series("|d mean(out^2) / d parameters| on white noise", series)
    mfc, physical, taps = series["mfc"], series["3x3 physical"], series["3x3 taps"]
    # MFC: the Gaussian averages ~(scale/h)^2 noise values, so the gradient shrinks.
    assert max(mfc) <= mfc[0] * 1.01 and mfc[-1] / mfc[0] < 0.1
    # The same coefficients on 3x3 differences: second differences of noise grow like
    # h^-2, their square like h^-4.
    assert physical[-1] / physical[0] > 1e3
    assert all(b > a for a, b in itertools.pairwise(physical))
    # A plain convolution's own taps: bounded, but the noise never averages out.
    assert 0.5 < taps[-1] / taps[0] < 2


def test_noisy_gradient_converges_to_the_clean_one_under_refinement() -> None:
    series = _gradient_series(clean=True)
    _print_series("|gradient(smooth + noise) - gradient(smooth)| of an MSE loss", series)
    mfc, physical, taps = series["mfc"], series["3x3 physical"], series["3x3 taps"]
    # MFC: the noise's share falls like (h / scale)^(d/2), half per refinement in 2D.
    assert all(b < 0.7 * a for a, b in itertools.pairwise(mfc))
    assert physical[-1] / physical[0] > 1e3
    # A plain convolution's taps: the noise's share levels off instead of vanishing.
    assert taps[-1] > 0.9 * taps[-2] and taps[-1] > 0.5 * taps[0]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(("size", "stride"), [(9, 1), (9, 2), (8, 3)])
def test_drop_in_for_a_same_padded_conv(dims: int, size: int, stride: int) -> None:
    layer = {1: MeshFreeConv1d, 2: MeshFreeConv2d, 3: MeshFreeConv3d}[dims](
        2, 5, 3, stride, padding=1)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](2, 5, 3, stride, padding=1)
    x = torch.randn(3, 2, *[size] * dims)
    assert layer(x).shape == conv(x).shape
    assert len(layer.orders) == len(derivative_orders(dims)) == 1 + dims + dims * (dims + 1) // 2
    # the strided output is the unstrided one subsampled
    full = MeshFreeConv(dims, 2, 5)
    full.load_state_dict(layer.state_dict())
    every = (..., *[slice(None, None, stride)] * dims)
    assert torch.allclose(layer(x), full(x)[every], atol=1e-5)


def test_pointwise_and_refused_settings() -> None:
    pointwise = MeshFreeConv2d(3, 2, 1)
    assert pointwise.orders == [(0, 0)]
    x = torch.randn(1, 3, 5, 5)
    want = torch.einsum("oi,bixy->boxy", pointwise.weight[:, :, 0], x)
    assert torch.allclose(pointwise(x), want + pointwise.bias.view(1, -1, 1, 1), atol=1e-6)
    for kwargs in ({"kernel_size": 4}, {"padding": 0}, {"spacing": 0.0}, {"scale": -1.0},
                   {"spacing": math.inf}, {"stride": 0}):
        with pytest.raises(ConfigError) as raised:
            MeshFreeConv2d(3, 2, **kwargs)  # type: ignore[arg-type]
        assert "\n" not in str(raised.value)


def test_set_spacing_follows_each_layer_step() -> None:
    model = nn.Sequential(MeshFreeConv1d(1, 2), nn.AvgPool1d(2), MeshFreeConv1d(2, 2, step=2))
    set_spacing(model, level_spacing(1, 0.5))
    assert [model[0].spacing, model[2].spacing] == [1.0, 2.0]
    assert level_spacing(0) == 1.0 and level_spacing(3, 0.25) == 2.0
