"""The convolution of a network's conv blocks, standard or mesh-free (`model.conv`).

Every model builds its grid convolutions through `conv_layer`, so the switch is one
argument: "standard" is torch's Conv1d/2d/3d, "meshfree" a `MeshFreeConv` of the same
shape contract (docs/methods.md, "Mesh-free convolutions").

A mesh-free layer's physical scale is fixed on the grid of level 0: (kernel_size - 1) / 4
spacings of its input there, `step` being that input's spacing in level-0 input spacings
(the product of the strides and poolings before the layer). `build_model` then sets every
layer to the spacing of the level it runs on (`set_spacing`), so the same weights compute
the same operator on every level that resolves the scale, and a model moved between
levels by a fusion needs no kernel resampling. On a level coarser than that (spacing
above twice the scale) the layer runs the grid's own central differences, the finest
operator that grid holds.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from hpc_multires.errors import ConfigError
from hpc_multires.models.meshfree import MeshFreeConv

ConvKind = Literal["standard", "meshfree"]
CONV_KINDS: tuple[str, ...] = ("standard", "meshfree")
_STANDARD = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_layer(dims: int, conv: str, in_channels: int, out_channels: int, kernel_size: int,
               *, stride: int = 1, padding: int | None = None, step: float = 1.0) -> nn.Module:
    """One convolution of `dims` spatial axes (1 to 3) of the kind `conv` names.

    standard: nn.ConvNd(in, out, kernel_size, stride, padding), padding kernel_size // 2 when
    not given (the map keeps its size for an odd kernel at stride 1).
    meshfree: `MeshFreeConv` keeping the map size ("same"; an odd kernel_size is needed and
    `padding`, when given, must be (kernel_size - 1) // 2), its scale (kernel_size - 1) / 4
    times `step` level-0 spacings (module docstring).
    """
    if not 1 <= dims <= 3:
        raise ConfigError(f"a convolution has 1 to 3 spatial axes, not {dims}")
    if conv == "standard":
        return _STANDARD[dims - 1](in_channels, out_channels, kernel_size, stride=stride,
                                   padding=kernel_size // 2 if padding is None else padding)
    if conv == "meshfree":
        # Built at level 0's spacing, which fixes its scale there; build_model moves it.
        return MeshFreeConv(dims, in_channels, out_channels, kernel_size, stride,
                            "same" if padding is None else padding, spacing=step, step=step)
    raise ConfigError(f"model.conv = {conv!r}; use one of {', '.join(CONV_KINDS)}")
