"""model.conv: the networks built with standard or mesh-free convolutions, and a mesh-free
model run at its stage's level."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hpc_multires.errors import ConfigError
from hpc_multires.methods.downsample import restrict_input
from hpc_multires.methods.fusion import transfer
from hpc_multires.models import build_model, conv_layer
from hpc_multires.models.config import ModelConfig
from hpc_multires.models.meshfree import MeshFreeConv

COSMO = ModelConfig(width=0.125, depth=3, head="gap", fc_sizes=(8,))
NEURON = ModelConfig(name="neuron_inverter", width=0.25, conv_channels=(8, 8), kernel_size=5,
                     pool=4, head="gap", fc_sizes=(16,))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_layer_gives_either_kind_with_the_same_shape_contract(dims: int) -> None:
    x = torch.randn(2, 3, *[12] * dims)
    standard = conv_layer(dims, "standard", 3, 5, 3)
    meshfree = conv_layer(dims, "meshfree", 3, 5, 3, step=2.0)
    assert type(standard) is (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    assert isinstance(meshfree, MeshFreeConv)
    assert (meshfree.spacing, meshfree.scale, meshfree.step) == (2.0, 1.0, 2.0)
    assert standard(x).shape == meshfree(x).shape == (2, 5, *[12] * dims)
    strided = conv_layer(dims, "meshfree", 3, 5, 3, stride=2)
    assert strided(x).shape == conv_layer(dims, "standard", 3, 5, 3, stride=2)(x).shape
    with pytest.raises(ConfigError, match="model.conv = 'spectral'; use one of standard, "
                                          "meshfree"):
        conv_layer(dims, "spectral", 3, 5, 3)
    with pytest.raises(ConfigError, match="kernel_size must be odd"):
        conv_layer(dims, "meshfree", 3, 5, 4)


@pytest.mark.parametrize(("cfg", "shape"), [(COSMO, (4, 16, 16, 16)), (NEURON, (4, 256))])
def test_meshfree_models_run_every_level_at_its_spacing_with_one_set_of_weights(
        cfg: ModelConfig, shape: tuple[int, ...]) -> None:
    cfg = ModelConfig(**{**cfg.__dict__, "conv": "meshfree"})
    models = {}
    for level in (0, 1, 2):
        coarse = (shape[0], *(n // 2**level for n in shape[1:]))
        models[level] = m = build_model(cfg, coarse, 3, level)
        layers = [x for x in m.modules() if isinstance(x, MeshFreeConv)]
        assert len(layers) == (cfg.depth if cfg.name == "cosmoflow" else len(cfg.conv_channels))
        assert not any(isinstance(x, (nn.Conv1d, nn.Conv3d)) for x in m.modules())
        pool = 2 if cfg.name == "cosmoflow" else cfg.pool
        for i, layer in enumerate(layers):
            assert layer.step == pool**i
            assert layer.spacing == 2**level * pool**i  # the level's grid, at this depth
            assert layer.scale == (cfg.kernel_size - 1) / 4 * pool**i  # fixed at level 0
        assert m(torch.randn(2, *coarse)).shape == (2, 3)
    # the same parameters at every level: a fusion moves every weight as it is
    names = {level: {k: v.shape for k, v in m.state_dict().items()}
             for level, m in models.items()}
    assert names[0] == names[1] == names[2]
    moved = transfer(models[2].state_dict(), models[0].state_dict())
    assert all(torch.equal(moved[k], v) for k, v in models[2].state_dict().items())


def smooth_traces(length: int, generator: torch.Generator) -> torch.Tensor:
    """(2, 4, length) sums of sines of 1 to 20 cycles: what a grid of length / 2 resolves
    (10 points or more per cycle)."""
    t = torch.arange(length, dtype=torch.float64) / length
    out = torch.zeros(2, 4, length, dtype=torch.float64)
    for k in range(1, 21):
        amp, phase = torch.randn(2, 4, 1, 2, generator=generator, dtype=torch.float64).unbind(-1)
        out += amp * torch.sin(2 * math.pi * k * t + phase) / k
    return out


@pytest.mark.parametrize("conv", ["meshfree", "standard"])
def test_a_level1_model_moved_to_level0_keeps_its_first_layer(conv: str) -> None:
    """A level-1 Neuron model transferred to level 0: on smooth traces its first conv block,
    restricted, gives what it gave on the level-1 traces. Mesh-free: the same operator at
    the level's spacing (scale 1 level-0 bin with kernel 5, resolved on both grids).
    Standard: the same taps now span half the length, so it does not (measured: 2.6e-3
    against 8e-2)."""
    cfg = ModelConfig(**{**NEURON.__dict__, "conv": conv, "kernel_size": 5})
    torch.manual_seed(0)
    coarse = build_model(cfg, (4, 200), 3, level=1).double()
    fine = build_model(cfg, (4, 400), 3, level=0).double()
    fine.load_state_dict(transfer(coarse.state_dict(), fine.state_dict()))
    x = smooth_traces(400, torch.Generator().manual_seed(1))
    first = slice(0, 3)  # pad, convolution, activation
    with torch.no_grad():
        on_fine = restrict_input(fine.features[first](x), 2)
        on_coarse = coarse.features[first](restrict_input(x, 2))
    inner = (..., slice(10, -10))
    err = float((on_fine - on_coarse)[inner].norm() / on_coarse[inner].norm())
    if conv == "meshfree":
        assert err < 1e-2
    else:
        assert err > 3e-2
