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
    # A mesh-free stem on level R takes 2^R out at every level, level 0 included.
    assert block_pools(4, 3, 0, "keep", stem_level=1) == [2, 4, 4]
    assert block_pools(2, 4, 2, "keep", stem_level=2) == [1, 1, 2, 2]
    with pytest.raises(ConfigError, match="smaller model.stem_level"):
        block_pools(2, 2, 0, "keep", stem_level=3)


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
    # A coarse step is still cheaper than a fine one: its first block computes on 2^(dL)
    # times fewer points.
    conv_types = (torch.nn.Conv1d, torch.nn.Conv3d)
    conv0 = next(m for m in fine.features.modules() if isinstance(m, conv_types))
    conv_c = next(m for m in coarse.features.modules() if isinstance(m, conv_types))
    points0 = conv0(torch.zeros(1, *shape0)).numel()
    points_c = conv_c(torch.zeros(1, *coarse_shape)).numel()
    assert points0 >= 0.9 * points_c * 2 ** (level * (len(shape0) - 1)), (points0, points_c)


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


# model.stem_level: a mesh-free first convolution. A level-R model moved to a finer level by
# `prolong` computes the same function of the fine sample as the coarse model of the same
# sample averaged down to level R: exact, so a fine stage starts where the coarse one ended.

@pytest.mark.parametrize("cfg,shape0,pool", [(COSMO, (4, 32, 32, 32), F.avg_pool3d),
                                             (NEURON, (4, 1600), F.avg_pool1d)])
@pytest.mark.parametrize("stem_level,level,detail", [(1, 1, False), (2, 2, False),
                                                     (2, 1, False), (1, 1, True)])
def test_mesh_free_stem_moves_between_levels_unchanged(cfg, shape0, pool, stem_level,
                                                       level, detail) -> None:
    from hpc_multires.methods.fusion import prolong

    cfg = dataclasses.replace(cfg, stem_level=stem_level, stem_detail=detail)
    torch.manual_seed(0)
    fine = build_model(cfg, shape0, 3, 0)
    coarse = build_model(cfg, (shape0[0], *(s >> level for s in shape0[1:])), 3, level)
    stem = next(m for m in fine.features if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv3d)))
    assert stem.stride[0] == 2**stem_level  # strided on level 0...
    assert stem.kernel_size[0] == cfg.kernel_size * 2**stem_level  # ...with resampled taps
    # Same flattened features at both levels: the dense layers need no resampling.
    assert coarse.dense_input_shapes() == fine.dense_input_shapes()
    fine.load_state_dict(prolong(coarse.state_dict(), fine.state_dict(), {}))
    x = torch.randn(3, *shape0)
    with torch.no_grad():
        want = coarse(pool(x, 2**level))
        got = fine(x)
    assert want.abs().mean() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # Without the resampled kernel (a fresh stem) the outputs differ: the check can fail.
    fresh = build_model(cfg, shape0, 3, 0)
    keep = {k: v for k, v in fine.state_dict().items() if not k.startswith("features.")}
    fresh.load_state_dict({**fresh.state_dict(), **keep})
    with torch.no_grad():
        assert (fresh(x) - want).abs().max() > 1e-3


def test_stem_level_and_dropped_pools_do_not_mix() -> None:
    from hpc_multires.plan.load import config_from_dict

    with pytest.raises(ConfigError, match="not both"):
        config_from_dict({"model": {"stem_level": 1, "coarse_pools": "drop"}})
    config_from_dict({"model": {"stem_level": 1}})


@pytest.mark.parametrize("cfg,shape0", [(COSMO, (4, 16, 16, 16)), (NEURON, (4, 800))])
def test_detail_branch_starts_closed_and_learns(cfg, shape0) -> None:
    """The branch exists only where the stem is strided, adds nothing at first, and its gate
    gets a gradient (so training can open it)."""
    cfg = dataclasses.replace(cfg, stem_level=1, stem_detail=True)
    torch.manual_seed(0)
    fine = build_model(cfg, shape0, 3, 0)
    assert build_model(cfg, (shape0[0], *(s // 2 for s in shape0[1:])), 3, 1).detail is None
    assert fine.detail is not None and torch.all(fine.detail.gate == 0)
    x = torch.randn(2, *shape0)
    fine(x).square().sum().backward()
    assert fine.detail.gate.grad is not None and fine.detail.gate.grad.abs().max() > 0
