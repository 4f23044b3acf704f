"""model.coarse_pools = "drop": coarse-level networks whose layers are the level-0 layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hpc_multires.errors import ConfigError
from hpc_multires.methods.fusion import transfer
from hpc_multires.models import build_model
from hpc_multires.models.scale import block_pools
from hpc_multires.plan.config import ModelConfig

COSMO = ModelConfig(name="cosmoflow", width=0.125, depth=4, head="flatten", fc_sizes=(8,))
NEURON = ModelConfig(name="neuron_inverter", width=0.1, conv_channels=(30, 90, 180), pool=4,
                     head="flatten", fc_sizes=(16,))


def test_block_pools() -> None:
    assert block_pools(2, 4, 2, "keep") == [2, 2, 2, 2]
    assert block_pools(2, 4, 0, "drop") == [2, 2, 2, 2]
    assert block_pools(2, 4, 1, "drop") == [1, 2, 2, 2]
    assert block_pools(2, 4, 2, "drop") == [1, 1, 2, 2]
    assert block_pools(4, 3, 1, "drop") == [2, 4, 4]
    assert block_pools(4, 3, 3, "drop") == [1, 2, 4]
    with pytest.raises(ConfigError, match="fewer pyramid levels"):
        block_pools(2, 2, 3, "drop")
    with pytest.raises(ConfigError, match="coarse_pools = 'keep'"):
        block_pools(3, 3, 1, "drop")  # a factor 2 cannot come out of poolings by 3


def _models(cfg: ModelConfig, shape0: tuple[int, ...], level: int,
            mode: str) -> tuple[torch.nn.Module, torch.nn.Module, tuple[int, ...]]:
    cfg = dataclasses.replace(cfg, coarse_pools=mode)  # type: ignore[arg-type]
    coarse_shape = (shape0[0], *(s >> level for s in shape0[1:]))
    torch.manual_seed(0)
    return (build_model(cfg, shape0, 3, 0), build_model(cfg, coarse_shape, 3, level),
            coarse_shape)


@pytest.mark.parametrize(("cfg", "shape0"), [(COSMO, (2, 32, 32, 32)), (NEURON, (4, 1600))])
@pytest.mark.parametrize("level", [1, 2])
def test_dropped_pools_give_level_0_layers(cfg: ModelConfig, shape0: tuple[int, ...],
                                           level: int) -> None:
    fine, coarse, coarse_shape = _models(cfg, shape0, level, "drop")
    # Same feature map after the conv blocks, so even the flatten head's dense layer has
    # the level-0 shape: transfer carries every weight over, nothing is re-initialised.
    f0 = fine.features(torch.zeros(1, *shape0))
    fc = coarse.features(torch.zeros(1, *coarse_shape))
    assert f0.shape == fc.shape
    moved = transfer(coarse.state_dict(), {k: torch.full_like(v, float("nan"))
                                           for k, v in fine.state_dict().items()})
    assert not any(v.isnan().any() for v in moved.values())
    # A coarse step is still cheaper than a fine one: its first block sees 2^L x fewer points.
    assert torch.Size(coarse_shape).numel() < torch.Size(shape0).numel()


@pytest.mark.parametrize(("cfg", "shape0"), [(COSMO, (2, 32, 32, 32)), (NEURON, (4, 1600))])
def test_kept_pools_shrink_the_maps(cfg: ModelConfig, shape0: tuple[int, ...]) -> None:
    fine, coarse, coarse_shape = _models(cfg, shape0, 1, "keep")
    f0 = fine.features(torch.zeros(1, *shape0))
    fc = coarse.features(torch.zeros(1, *coarse_shape))
    assert fc.shape[2:] != f0.shape[2:]


def test_only_the_first_pooling_is_dropped() -> None:
    # At level 1 the network differs from the level-0 one in its first pooling alone: from
    # the second block on both compute the same function of the same map.
    fine, coarse, _ = _models(COSMO, (2, 32, 32, 32), 1, "drop")
    coarse.load_state_dict(fine.state_dict())
    x = torch.randn(3, 2, 32, 32, 32)
    h = F.max_pool3d(fine.features[1](fine.features[0](x)), 2)  # level-0 block 1 output
    rest_fine = fine.head(fine.pool(fine.features[3:](h)))
    rest_coarse = coarse.head(coarse.pool(coarse.features[3:](h)))
    torch.testing.assert_close(rest_coarse, rest_fine)
