"""Dynamic input and kernel downsampling: some steps train on coarse inputs, same weights.

On a step chosen by `downsample_decision` the trainer averages the batch down by `factor`
per spatial axis (`restrict_input`) and runs the model inside `downsampled(model, factor)`,
where every Conv1d/2d/3d uses its kernel pooled onto the coarser grid (`pool_kernel`): a
differentiable function of the full-size kernel, so the coarse step's gradient lands on
the same weights as a full-resolution step's. Normalisation and dense layers run
unchanged (a dense layer must not depend on the map size: model.head = "gap").

Which steps are coarse is a pure function of (seed, step) and the configured schedule
(`downsample_decision`, in `coarse_steps`, which needs no torch), so every rank takes the
same decision without talking, and a resumed run takes the decisions the uninterrupted
run took. The derivations are in docs/methods.md, "Dynamic downsampling".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from hpc_multires.errors import ConfigError
from hpc_multires.methods.coarse_steps import KERNEL_POOLS, check_downsample, downsample_decision
from hpc_multires.models.meshfree import MeshFreeConv

__all__ = ["check_downsample", "downsample_decision", "downsampled", "pool_kernel",
           "restrict_input"]


def restrict_input(x: torch.Tensor, factor: int) -> torch.Tensor:
    """`x` averaged over blocks of `factor` points per spatial axis, as the data pyramid
    averages a level: (B, C, *S) -> (B, C, *S / factor), 1 to 3 spatial axes."""
    check_downsample(0.0, factor)
    spatial = x.shape[2:]
    if not 1 <= len(spatial) <= 3:
        raise ValueError(f"restrict_input takes (B, C, *spatial) with 1 to 3 spatial axes, "
                         f"not shape {tuple(x.shape)}")
    if factor == 1:
        return x
    if any(s % factor for s in spatial):
        raise ConfigError(f"train.downsample.factor = {factor} must divide the sample axes "
                          f"{tuple(spatial)}; use a factor that divides them (or crop the "
                          "samples to a multiple of it)")
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(spatial) - 1]
    return pool(x, factor)


def _axis_pooling(size: int, factor: int, mode: str) -> torch.Tensor:
    """(compact size, size) matrix taking one kernel axis of `size` taps to the grid
    `factor` times coarser. Tap i sits at offset j = i - (size - 1) // 2 fine points;
    coarse tap J at offset J * factor. bilinear: tap j goes to the two nearest coarse taps
    with hat weights max(0, 1 - |j - J f| / f); avg: to the coarse tap whose cell
    |j - J f| <= f / 2 holds it, split in halves on a cell boundary."""
    left = (size - 1) // 2
    right = size - 1 - left
    if mode == "bilinear":
        lo, hi = -math.ceil(left / factor), math.ceil(right / factor)
    else:
        lo, hi = -math.floor(left / factor + 0.5), math.floor(right / factor + 0.5)
    offsets = torch.arange(-left, right + 1, dtype=torch.float64)  # (size,)
    centres = torch.arange(lo, hi + 1, dtype=torch.float64) * factor  # (compact,)
    gap = (offsets[None, :] - centres[:, None]).abs()  # (compact, size)
    if mode == "bilinear":
        return (1 - gap / factor).clamp(min=0)
    return (2 * gap < factor).double() + 0.5 * (2 * gap == factor).double()


def pool_kernel(weight: torch.Tensor, factor: int, mode: str = "avg",
                keep_size: bool = False) -> torch.Tensor:
    """The kernel that acts on a grid `factor` times coarser as `weight` acts on its own:
    conv(restrict_input(x, f), pool_kernel(w, f)) ~ restrict_input(conv(x, w), f).

    weight: (out, in / groups, *k) with 1 to 3 spatial axes, taps at offsets j - (k - 1) // 2
    (the "same" padding of torch). Along each axis the taps are moved onto the coarse grid
    (`_axis_pooling`) keeping their sum, so a constant input gives the same output; "bilinear"
    also keeps the first moment (a linear ramp gives the same output); for factor 2 the two
    coincide. A kernel of k taps becomes 2 ceil(r / f) + 1 taps (bilinear) or
    2 floor(r / f + 1/2) + 1 (avg) for odd k = 2r + 1, still odd and centred; an even one
    keeps the (k' - 1) // 2 left offset convention. One tap stays one tap, unchanged: a
    pointwise convolution commutes with averaging. With `keep_size` the pooled kernel is
    set back into the original shape (zeros outside), so a layer keeps its padding and
    output size. Linear in `weight`, so gradients flow back to it.
    """
    if not 3 <= weight.dim() <= 5:
        raise ConfigError(f"pool_kernel takes a Conv1d/2d/3d weight (out, in, *k), not shape "
                          f"{tuple(weight.shape)}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ConfigError(f"kernel pooling factor {factor!r}: use an integer >= 1")
    if mode not in KERNEL_POOLS:
        raise ConfigError(f"train.downsample.kernel_pool = {mode!r}; use one of "
                          f"{', '.join(KERNEL_POOLS)}")
    out = weight
    for axis in range(2, weight.dim()):
        size = weight.shape[axis]
        pooling = _axis_pooling(size, factor, mode).to(weight)  # (k', k)
        if keep_size:
            # coarse tap J back at index (size - 1) // 2 + J of a kernel of the old size
            lo = (size - 1) // 2 - (pooling.shape[0] - 1) // 2
            pooling = F.pad(pooling, (0, 0, lo, size - lo - pooling.shape[0]))
        out = torch.movedim(torch.tensordot(out, pooling, dims=([axis], [1])), -1, axis)
    return out


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _pooled_conv_forward(conv: nn.Module, factor: int,
                         mode: str) -> Callable[..., torch.Tensor]:
    """`conv`'s own `_conv_forward` (what its forward calls with its weight and bias), with
    the weight pooled on the way: `pool_kernel` of the layer's weight as it is at the call."""
    plain: Callable[..., torch.Tensor] = type(conv)._conv_forward  # type: ignore[attr-defined]

    def forward(x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        return plain(conv, x, pool_kernel(weight, factor, mode, keep_size=True), bias)

    return forward


@contextmanager
def downsampled(model: nn.Module, factor: int, mode: str = "avg") -> Iterator[nn.Module]:
    """Within the block, `model` runs on inputs `factor` times coarser (`restrict_input`):
    every Conv1d/2d/3d computes with its kernel pooled by `pool_kernel` (same shape, so
    padding and strides are unchanged) and every MeshFreeConv with its spacing times
    `factor`. The pooled kernels are computed from the layers' own weights on every
    forward, so backward (inside the block or after it) reaches the full-size kernels.
    Other layers run unchanged.

    The parameters themselves are never touched, not even re-registered: each layer's
    `_conv_forward` is wrapped for the block's duration instead. An optimizer, DDP's
    gradient hooks and Horovod's hold the parameters and the autograd nodes that accumulate
    their gradients; torch's parametrize would re-set each weight (`set_`), which gives it a
    new such node, and DDP would then never see the gradients of the pooled layers again.

    A dilated convolution (model.kernel_level) is refused: its taps are already spread
    over a coarser grid, and pooling them densely would change the layer's reach."""
    check_downsample(0.0, factor, kernel_pool=mode)
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, CONVS)]
    meshfree = [m for m in model.modules() if isinstance(m, MeshFreeConv)]
    for name, conv in convs:
        if any(d != 1 for d in conv.dilation):
            raise ConfigError(f"train.downsample cannot pool the dilated convolution {name!r} "
                              f"(dilation {conv.dilation}); use model.kernel_level = 0")
        if "_conv_forward" in vars(conv):
            raise ConfigError(f"train.downsample cannot pool {name!r}: it is already inside "
                              "a downsampled block")
    if factor == 1:
        yield model
        return
    done: list[nn.Module] = []
    spacings = [layer.spacing for layer in meshfree]
    try:
        for _, conv in convs:
            # an instance attribute: found before the class's method
            object.__setattr__(conv, "_conv_forward", _pooled_conv_forward(conv, factor, mode))
            done.append(conv)
        for layer in meshfree:
            layer.spacing *= factor
        yield model
    finally:
        for layer, spacing in zip(meshfree, spacings, strict=True):
            layer.spacing = spacing
        for pooled in done:
            del vars(pooled)["_conv_forward"]
