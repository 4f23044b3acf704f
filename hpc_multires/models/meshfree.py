"""Mesh-free convolutions: layers defined in physical coordinates, not in grid points.

A mesh-free convolution (MFC) computes

    out = bias + sum_k W_k  scale^|k|  d^k (G_scale * u)

where d^k runs over the differential operators of order 0 to 2 (the identity, d/dx_i,
d2/dx_i^2 and d2/dx_i dx_j), G_scale is a Gaussian of standard deviation `scale` in
physical units, and each W_k is an (out, in) channel-mixing matrix. The operators act on
the Gaussian-smoothed field, so they are moved onto the Gaussian: each is a sampled
Gaussian derivative on the input's grid (spacing `spacing`), separable over the axes, its
discrete moments set so that it is exact on polynomials of its order. Multiplying by
scale^|k| makes the features dimensionless, so W_k means the same at every spacing.

Why smoothing at a fixed physical scale (docs/methods.md, "Mesh-free convolutions"): the
same parameters then compute the same continuous operator on every grid that resolves
`scale`, and on white noise of a fixed variance per point the Gaussian averages about
(scale / spacing)^d points, so the features, the loss and its gradient shrink as the grid
is refined instead of growing like the derivative stencils of a plain convolution read in
physical units.

On a grid too coarse for `scale` (spacing > 2 * scale) the Gaussian is widened to half a
grid spacing: the operators become the grid's own central differences, the finest
operator that grid can hold.
"""

from __future__ import annotations

import functools
import math
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import nn

from hpc_multires.errors import ConfigError

MAX_ORDER = 2  # identity, first and second derivatives
REACH = 5.0  # the kernels reach this many (widened) Gaussian widths either side


def derivative_orders(dims: int, max_order: int = MAX_ORDER) -> list[tuple[int, ...]]:
    """The operators of an MFC as derivative orders per axis: the identity, d/dx_i per
    axis, d2/dx_i^2 per axis, then d2/dx_i dx_j for i < j (up to `max_order` in all)."""
    orders: list[tuple[int, ...]] = [(0,) * dims]
    for total in range(1, max_order + 1):
        for axis in range(dims):
            orders.append(tuple(total if a == axis else 0 for a in range(dims)))
        if total == 2:
            for i, j in combinations(range(dims), 2):
                orders.append(tuple(1 if a in (i, j) else 0 for a in range(dims)))
    return orders


@functools.lru_cache(maxsize=64)
def axis_kernels(spacing: float, scale: float) -> torch.Tensor:
    """The 1D kernels of one axis, (3, T) float64: row m applied as a correlation on a grid
    of `spacing` gives scale^m d^m (G * u), with G the Gaussian of width max(scale,
    spacing / 2). T = 2R + 1 taps, R = max(1, ceil(5 * width / spacing)).

    Row m's discrete moments are exact: before the factor scale^m, sum_j k_m[j] t_j^p / p!
    is 1 for p = m and 0 for p < m (t_j = j * spacing), so each row is exact on polynomials
    of degree m whatever the spacing, and on a grid that resolves the Gaussian the rows are
    its sampled derivatives.
    Cached, so do not modify the result in place."""
    width = max(scale, spacing / 2)
    radius = max(1, math.ceil(REACH * width / spacing))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64) * spacing
    g = torch.exp(-0.5 * (t / width) ** 2)
    smooth = g / g.sum()
    first = t * g / (t * t * g).sum()
    second = (t * t - (t * t * g).sum() / g.sum()) * g  # zero sum, even
    second = 2 * second / (second * t * t).sum()
    return torch.stack([smooth, scale * first, scale**2 * second])


def level_spacing(level: int | float, base: float = 1.0) -> float:
    """Grid spacing of pyramid level `level` when level 0 has spacing `base`: base * 2^level
    (a level-L sample averages 2^L points per axis)."""
    return float(base) * 2.0 ** level


class MeshFreeConv(nn.Module):
    """A convolution in physical coordinates for 1D, 2D or 3D maps (module docstring).

    A drop-in for nn.ConvNd(in_channels, out_channels, kernel_size, stride, padding="same")
    with an odd kernel_size: the output has the input's size divided by `stride`, rounded
    up, and positions outside the map count as 0. kernel_size sets the default physical
    scale, (kernel_size - 1) / 4 grid spacings at `spacing` (a 3-tap kernel: half a
    spacing, i.e. the grid's own differences there), and kernel_size 1 keeps only the
    identity (a pointwise convolution, the same on every grid).

    `spacing` is the physical grid spacing of the input (e.g. `level_spacing(level)`, any
    positive float); `step` is the spacing of this layer's input map in units of the
    network's input spacing (the product of the strides and poolings before it), which
    `set_spacing` uses to set every layer of a network from the input's spacing.
    Parameters: weight (out, in, operators), bias (out,).
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: str | int = "same", bias: bool = True, *,
                 spacing: float = 1.0, scale: float | None = None, step: float = 1.0) -> None:
        super().__init__()
        if dims not in (1, 2, 3):
            raise ConfigError(f"a mesh-free convolution is 1D, 2D or 3D, not {dims}D")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"model.kernel_size = {kernel_size}: a mesh-free convolution is "
                              "centred, so its kernel_size must be odd (3, 5, ...)")
        if padding not in ("same", (kernel_size - 1) // 2):
            raise ConfigError(f"a mesh-free convolution keeps the map size (padding 'same' or "
                              f"{(kernel_size - 1) // 2} for kernel_size {kernel_size}), "
                              f"not padding {padding!r}")
        if stride < 1:
            raise ConfigError(f"convolution stride must be >= 1, not {stride}")
        self.dims, self.stride = dims, int(stride)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.spacing = _positive("spacing", spacing)
        self.scale = _positive("scale", (kernel_size - 1) / 4 * spacing if scale is None
                               else scale) if kernel_size > 1 else 0.0
        self.step = _positive("step", step)
        self.orders = derivative_orders(dims, MAX_ORDER if kernel_size > 1 else 0)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, len(self.orders)))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.ConvNd's default scale: uniform in +-1/sqrt(fan_in), with the operators as taps
        bound = 1 / math.sqrt(self.in_channels * len(self.orders))
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The dimensionless operators on `x`: (B, C, *S) -> (B, C, operators, *S / stride)."""
        if x.dim() != self.dims + 2:
            raise ValueError(f"{self.dims}D mesh-free convolution got input of shape "
                             f"{tuple(x.shape)}; expected (B, C, *{self.dims} spatial axes)")
        rows = (axis_kernels(self.spacing, self.scale) if self.orders[1:]
                else torch.ones(1, 1, dtype=torch.float64)).to(x)  # (orders, T)
        taps = rows.shape[1]
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        max_order = max(map(sum, self.orders))
        # Separable: filter axis by axis, keeping every prefix of derivative orders whose
        # total leaves room for more. Each axis is subsampled by the stride right after its
        # own filter, which is exact because later filters act on the other axes.
        prefixes: dict[tuple[int, ...], torch.Tensor] = {(): x}
        for axis in range(self.dims):
            longer: dict[tuple[int, ...], torch.Tensor] = {}
            for prefix, y in prefixes.items():
                batch, channels = y.shape[:2]
                n = max_order - sum(prefix) + 1  # orders 0 .. n-1 along this axis
                shape = [1] * self.dims
                shape[axis] = taps
                weight = rows[:n].repeat(channels, 1).view(channels * n, 1, *shape)
                pad = [0] * self.dims
                pad[axis] = taps // 2
                z = conv(y, weight, padding=tuple(pad), groups=channels)  # (B, C * n, *S)
                if self.stride > 1:
                    index = [slice(None)] * z.dim()
                    index[2 + axis] = slice(None, None, self.stride)
                    z = z[tuple(index)]
                z = z.view(batch, channels, n, *z.shape[2:])
                for m in range(n):
                    longer[(*prefix, m)] = z[:, :, m]
            prefixes = longer
        return torch.stack([prefixes[o] for o in self.orders], dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, *S) -> (B, C_out, *ceil(S / stride))
        out = torch.einsum("oik,bik...->bo...", self.weight, self.features(x))
        if self.bias is not None:
            out = out + self.bias.view(1, -1, *([1] * self.dims))
        return out

    def extra_repr(self) -> str:
        return (f"{self.dims}D, {self.in_channels}, {self.out_channels}, "
                f"operators={len(self.orders)}, stride={self.stride}, spacing={self.spacing:g}, "
                f"scale={self.scale:g}, step={self.step:g}, bias={self.bias is not None}")


class MeshFreeConv1d(MeshFreeConv):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: str | int = "same", bias: bool = True,
                 **physical: float) -> None:
        super().__init__(1, in_channels, out_channels, kernel_size, stride, padding, bias,
                         **physical)


class MeshFreeConv2d(MeshFreeConv):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: str | int = "same", bias: bool = True,
                 **physical: float) -> None:
        super().__init__(2, in_channels, out_channels, kernel_size, stride, padding, bias,
                         **physical)


class MeshFreeConv3d(MeshFreeConv):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: str | int = "same", bias: bool = True,
                 **physical: float) -> None:
        super().__init__(3, in_channels, out_channels, kernel_size, stride, padding, bias,
                         **physical)


def set_spacing(model: nn.Module, spacing: float) -> None:
    """Tell every mesh-free convolution of `model` that the network's input has grid
    spacing `spacing` (e.g. `level_spacing(level)`): each layer's own spacing is that
    times its `step`."""
    spacing = _positive("spacing", spacing)
    for module in model.modules():
        if isinstance(module, MeshFreeConv):
            module.spacing = spacing * module.step


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"mesh-free convolution {name} must be a positive length, not {value}")
    return value
