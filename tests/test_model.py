"""CosmoFlow architecture: shapes, heads, the full-size parameter count, depth checks."""

from __future__ import annotations

import pytest
import torch

from hpc_multires.errors import ConfigError
from hpc_multires.models import build_model
from hpc_multires.models.cosmoflow import CosmoFlow
from hpc_multires.plan.config import ModelConfig


def test_full_size_model_matches_mlperf_scale() -> None:
    # 128^3 x 4 input, 5 blocks of 32..512 filters, dense 128 -> 64 -> 4: about 8.9 M
    # parameters, i.e. the ~36 MB gradient the allreduce benchmark uses.
    m = CosmoFlow(in_channels=4, spatial=(128, 128, 128), num_outputs=4)
    assert sum(p.numel() for p in m.parameters()) == 8_907_556


@pytest.mark.parametrize("head", ["flatten", "gap"])
def test_output_shape_and_range(head: str) -> None:
    torch.manual_seed(0)
    m = CosmoFlow(in_channels=2, spatial=(16, 16, 16), num_outputs=3, width=0.125, depth=3,
                  head=head)  # type: ignore[arg-type]
    out = m(torch.randn(5, 2, 16, 16, 16) * 100)
    assert out.shape == (5, 3)
    assert out.abs().max() <= 1.2


def test_gap_head_accepts_other_sizes() -> None:
    m = CosmoFlow(in_channels=1, spatial=(16, 16, 16), num_outputs=1, width=0.125, depth=2,
                  head="gap")
    assert m(torch.randn(2, 1, 32, 32, 32)).shape == (2, 1)


def test_depth_too_large_for_the_samples() -> None:
    with pytest.raises(ConfigError, match="model.depth <= 3"):
        CosmoFlow(in_channels=1, spatial=(8, 8, 8), num_outputs=1, depth=4)
    # The gap head takes it: the same weights run on a coarse pyramid level.
    m = CosmoFlow(in_channels=1, spatial=(8, 8, 8), num_outputs=1, depth=4, width=0.125,
                  head="gap")
    assert m(torch.randn(2, 1, 8, 8, 8)).shape == (2, 1)


def test_build_model_rejects_non_3d_samples() -> None:
    with pytest.raises(ConfigError, match="takes 3D samples"):
        build_model(ModelConfig(), (4, 64, 64), 2)


@pytest.mark.parametrize(("spatial", "depth", "extra"), [
    ((12, 12, 12), 3, {}),  # 12 -> 6 -> 3 -> 1: an odd map before the last pooling
    ((10, 16, 16), 3, {}),  # one odd axis
    ((20, 20, 20), 3, {"kernel_level": 1, "pool_type": "avg"}),  # level-consistent: 5 -> 2
    ((40, 40, 40), 4, {"stem_level": 1}),  # mesh-free stem: 40 -> 20 -> 20 -> 10 -> 5 -> 2
])
def test_flatten_head_takes_sizes_with_odd_maps(spatial: tuple[int, ...], depth: int,
                                                extra: dict) -> None:
    """The flatten head's dense layer is sized for spatial // 2^depth per axis, which is
    what `prolong` assumes too; the poolings must floor odd maps to match (ceil_mode, which
    the gap head wants, left 12^3 at depth 3 with 2^3 features, not 1, and a torch error)."""
    cfg = ModelConfig(name="cosmoflow", width=0.0625, depth=depth, head="flatten",
                      fc_sizes=(4,), **extra)
    m = build_model(cfg, (1, *spatial), 2)
    x = torch.randn(2, 1, *spatial)
    assert m(x).shape == (2, 2)
    (shape,) = m.dense_input_shapes().values()
    assert tuple(m.features(x).shape[1:]) == shape
    assert shape[1:] == tuple(s // 2**depth for s in spatial)


def test_gap_head_keeps_a_one_voxel_map() -> None:
    # The gap head pools with ceil_mode: 12 -> 6 -> 3 -> 2 -> 1, every voxel counted.
    m = CosmoFlow(in_channels=1, spatial=(12, 12, 12), num_outputs=1, width=0.0625, depth=4,
                  head="gap")
    assert m.features(torch.randn(1, 1, 12, 12, 12)).shape[2:] == (1, 1, 1)


def test_batch_norm_normalises_per_batch_and_moves_between_levels() -> None:
    """model.norm = "batch": a BatchNorm after every convolution. It normalises over the
    batch, not per sample, so two samples that differ only in amplitude still give two
    outputs; and its statistics are buffers, which `transfer` and `average` carry to the
    next level's model."""
    from hpc_multires.methods.fusion import average, transfer

    cfg = ModelConfig(name="cosmoflow", width=0.25, depth=3, head="gap", norm="batch")
    fine = build_model(cfg, (4, 16, 16, 16), 4, level=0)
    coarse = build_model(cfg, (4, 8, 8, 8), 4, level=1)
    norms = [m for m in fine.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(norms) == 3
    assert not any(isinstance(m, torch.nn.BatchNorm3d)
                   for m in build_model(ModelConfig(name="cosmoflow", width=0.25, depth=3,
                                                    head="gap"), (4, 16, 16, 16), 4).modules())
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16, 16)
    x[1] = 3.0 * x[0]  # the same field, three times the amplitude
    fine.train()
    out = fine(x)
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    coarse.train()
    coarse(torch.randn(4, 4, 8, 8, 8) * 2.0 + 1.0)  # moves its running statistics
    moved = transfer(coarse.state_dict(), fine.state_dict())
    stats = [k for k in moved if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 6
    assert all(torch.equal(moved[k], coarse.state_dict()[k]) for k in stats)
    mixed = average([coarse.state_dict(), fine.state_dict()], fine.state_dict(), [1, 1])
    key = stats[0]
    expected = (coarse.state_dict()[key] + fine.state_dict()[key]) / 2
    assert torch.allclose(mixed[key], expected)
    tracked = [k for k in mixed if k.endswith("num_batches_tracked")]
    assert tracked and all(mixed[k].dtype == torch.long for k in tracked)
