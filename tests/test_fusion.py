"""Fusion operators on hand-made state dicts and on real layers."""

from __future__ import annotations

import math

import pytest
import torch

from hpc_multires.errors import ConfigError
from hpc_multires.methods.fusion import (
    average,
    bottom_layer_names,
    bottom_top,
    check_bottom_layers,
    fuse,
    layer_names,
    prolong,
    prolong_dense,
    shrink,
    transfer,
)


def sd(**entries: list[float] | torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in entries.items()}


def test_transfer_copies_matching_name_and_shape_only() -> None:
    source = sd(**{"conv.weight": [1.0, 2.0], "dense.weight": [[1.0, 2.0]], "extra": [5.0]})
    target = sd(**{"conv.weight": [0.0, 0.0], "dense.weight": [[0.0, 0.0, 0.0]]})
    out = transfer(source, target)
    assert out["conv.weight"].tolist() == [1.0, 2.0]
    assert out["dense.weight"].tolist() == [[0.0, 0.0, 0.0]]  # shape differs: fresh kept
    assert set(out) == set(target)
    out["conv.weight"][0] = 9  # a copy, not a view of the source
    assert source["conv.weight"][0] == 1


@pytest.mark.parametrize("spatial", [(3,), (2, 3), (2, 2, 3)])
def test_prolonged_dense_layer_gives_the_same_output(spatial: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    c, out_features = 4, 5
    coarse = torch.nn.Linear(c * torch.Size(spatial).numel(), out_features).double()
    feats = torch.randn(7, c, *spatial, dtype=torch.float64)  # (B, C, *S)
    fine_feats = feats
    for axis in range(2, 2 + len(spatial)):  # nearest-neighbour prolongation of the input
        fine_feats = fine_feats.repeat_interleave(2, dim=axis)
    fine = torch.nn.Linear(fine_feats[0].numel(), out_features).double()
    fused = prolong({"weight": coarse.weight.data, "bias": coarse.bias.data},
                    {"weight": fine.weight.data, "bias": fine.bias.data},
                    {"weight": ((c, *spatial), tuple(2 * s for s in spatial))})
    fine.load_state_dict(fused)
    torch.testing.assert_close(fine(fine_feats.flatten(1)), coarse(feats.flatten(1)),
                               rtol=1e-12, atol=1e-12)


def test_prolong_to_sizes_that_are_not_a_multiple() -> None:
    # 1D pooling floors odd lengths: 12 coarse positions (800 bins / 64) feed 25 fine ones
    # (1,600 / 64). Fine position j covers the stretch of coarse position j // 2, so the
    # weights stay aligned in time; the 25th position has no coarse partner and reuses the
    # last one.
    w = torch.arange(12.0).reshape(1, 12)
    fine = prolong_dense(w, (1, 12), (25,))
    assert fine.shape == (1, 25)
    expected = torch.tensor([min(j // 2, 11) / 2 for j in range(25)]).reshape(1, 25)
    torch.testing.assert_close(fine, expected)
    # On the upsampled coarse features (plus one extra position) the output is the same.
    feats = torch.randn(3, 12)
    fine_feats = torch.cat([feats.repeat_interleave(2, dim=1), torch.zeros(3, 1)], dim=1)
    torch.testing.assert_close(fine_feats @ fine.T, feats @ w.T)
    with pytest.raises(ValueError, match="differ in more than"):
        prolong({"w": torch.ones(2, 8)}, {"w": torch.ones(3, 16)}, {"w": ((1, 8), (16,))})


def test_prolong_with_the_level_factor_when_pooling_floored() -> None:
    # The Neuron Inverter on 1,000 bins: level 2 (250 bins) pools to 3 positions, level 0
    # to 15 (1000 / 64 floored). The levels differ by 4 per axis; 15 / 3 rounds to 5.
    torch.manual_seed(0)
    w = torch.randn(2, 4 * 3, dtype=torch.float64)  # (out, C * S), C = 4
    feats = torch.randn(6, 4, 3, dtype=torch.float64)  # (B, C, S)
    # The fine features cover the same stretch 4 times as finely, plus 3 positions past
    # the coarse map's end.
    fine_feats = torch.cat([feats.repeat_interleave(4, dim=2),
                            torch.zeros(6, 4, 3, dtype=torch.float64)], dim=2)  # (B, C, 15)
    fine = prolong_dense(w, (4, 3), (15,), factor=4)
    torch.testing.assert_close(fine_feats.flatten(1) @ fine.T, feats.flatten(1) @ w.T,
                               rtol=1e-12, atol=1e-12)
    guessed = prolong_dense(w, (4, 3), (15,))  # factor 5: the output is not kept
    assert not torch.allclose(fine_feats.flatten(1) @ guessed.T, feats.flatten(1) @ w.T)
    # Through prolong and fuse, as the driver calls them.
    out = fuse("prolong", [{"w": w}], {"w": torch.zeros(2, 60, dtype=torch.float64)},
               dense_layers={"w": ((4, 3), (15,))}, factor=4)
    torch.testing.assert_close(out["w"], fine)
    # sampled: the coarse weights at every 4th fine position, 0 in between.
    spread = prolong_dense(w, (4, 3), (15,), sampled=True, factor=4).reshape(2, 4, 15)
    torch.testing.assert_close(spread[..., 0:12:4], w.reshape(2, 4, 3))
    assert spread[..., [1, 2, 3, 5, 13, 14]].abs().sum() == 0


def test_prolong_factor_is_what_the_network_left_of_the_level_factor() -> None:
    # model.coarse_pools = "drop" (or model.stem_level) takes part or all of the level
    # factor out before the dense layer: the map factor is the power of two dividing the
    # level factor that fits, 1 for equal maps, 2 for 7 -> 15 at a level factor of 4.
    w = torch.arange(7.0).reshape(1, 7)
    torch.testing.assert_close(prolong_dense(w, (1, 7), (7,), factor=4), w)
    torch.testing.assert_close(prolong_dense(w, (1, 7), (15,), factor=4),
                               prolong_dense(w, (1, 7), (15,), factor=2))
    assert prolong_dense(w, (1, 7), (15,), factor=4)[0, 14] == 3.0  # 6 / 2: reused, halved
    with pytest.raises(ValueError, match="7 coarse positions cannot become 40 fine ones"):
        prolong_dense(w, (1, 7), (40,), factor=4)
    with pytest.raises(ValueError, match="factor = 3"):
        prolong_dense(w, (1, 7), (21,), factor=3)


@pytest.mark.parametrize("opts", [{}, {"stem_level": 1}, {"coarse_pools": "drop"},
                                  {"kernel_level": 2}])
def test_prolong_with_the_level_factor_on_real_models(opts: dict) -> None:
    """Neuron Inverter, 1,000 bins, level 2 -> 0: the dense layer prolonged with the level
    factor 4 equals the one prolonged with the factor its feature maps really differ by."""
    from hpc_multires.models import build_model
    from hpc_multires.plan.config import ModelConfig

    cfg = ModelConfig(name="neuron_inverter", width=0.125, head="flatten", fc_sizes=(8,),
                      **opts)
    fine, coarse = build_model(cfg, (4, 1000), 3, 0), build_model(cfg, (4, 250), 3, 2)
    (layer, coarse_shape), = coarse.dense_input_shapes().items()
    fine_spatial = fine.dense_input_shapes()[layer][1:]
    state = coarse.state_dict()
    sampled = getattr(fine, "level_factor", 1) > 1
    out = prolong(state, fine.state_dict(), {layer: (coarse_shape, fine_spatial)}, sampled,
                  factor=4)
    map_factor = fine_spatial[0] // coarse_shape[1]  # 15 // 3, 15 // 7, 15 // 15, 15 // 3
    map_factor = {5: 4, 2: 2, 1: 1}[map_factor]
    torch.testing.assert_close(out[layer], prolong_dense(state[layer], coarse_shape,
                                                         fine_spatial, sampled, map_factor))


def test_average_weights_layers_that_fit() -> None:
    a = sd(**{"w": [1.0, 1.0], "dense": [[1.0]]})
    b = sd(**{"w": [3.0, 5.0], "dense": [[1.0, 1.0]]})
    target = sd(**{"w": [0.0, 0.0], "dense": [[7.0]]})
    out = average([a, b], target, weights=[1, 3])
    assert out["w"].tolist() == [2.5, 4.0]
    assert out["dense"].tolist() == [[1.0]]  # only `a` fits
    assert average([a, b], target)["w"].tolist() == [2.0, 3.0]
    with pytest.raises(ValueError):
        average([a, b], target, weights=[1.0])


def test_bottom_top_splits_by_layer_order() -> None:
    names = ["features.0.weight", "features.0.bias", "features.3.weight", "head.1.weight"]
    bottom = {n: torch.full((2,), 1.0) for n in names}
    top = {n: torch.full((2,), 2.0) for n in names}
    target = {n: torch.zeros(2) for n in names}
    assert layer_names(target) == ["features.0", "features.3", "head.1"]
    out = bottom_top(bottom, top, target, bottom_layers=2)
    assert [float(out[n][0]) for n in names] == [1.0, 1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="bottom_layers = 4"):
        bottom_top(bottom, top, target, bottom_layers=4)


def test_bottom_top_counts_the_layers_of_the_bottom_model() -> None:
    # model.stem_level with stem_detail: the finer target has a full-resolution branch
    # beside the stem, first in its state dict; the coarse bottom model has none.
    stack = ["features.0.weight", "features.0.bias", "features.3.weight", "head.1.weight"]
    names = ["detail.gate", "detail.conv.weight", *stack]
    bottom = {n: torch.full((2,), 1.0) for n in stack}
    top = {n: torch.full((2,), 2.0) for n in names}
    target = {n: torch.zeros(2) for n in names}
    assert layer_names(target)[:2] == ["detail", "detail.conv"]
    assert bottom_layer_names(bottom, target) == ["features.0", "features.3", "head.1"]
    out = bottom_top(bottom, top, target, bottom_layers=2)
    assert [float(out[n][0]) for n in names] == [2.0, 2.0, 1.0, 1.0, 1.0, 2.0]
    # A bottom model with the branch too: it is still not counted, and comes from the top.
    out = bottom_top(top, {n: torch.full((2,), 3.0) for n in names}, target, bottom_layers=1)
    assert [float(out[n][0]) for n in names] == [3.0, 3.0, 2.0, 2.0, 3.0, 3.0]


def test_bottom_layers_beyond_the_model_is_a_user_error() -> None:
    names = ["features.0.weight", "features.3.weight", "head.1.weight"]
    state = {n: torch.zeros(2) for n in names}
    assert check_bottom_layers(state, state, 2, stage="fused1") == ["features.0", "features.3"]
    with pytest.raises(ConfigError, match=r"stage 'fused1': bottom_layers = 4, but the bottom "
                                          r"model has 3 layers .*; use 1 to 3"):
        check_bottom_layers(state, state, 4, stage="fused1")
    with pytest.raises(ConfigError, match="bottom_layers = 4"):
        bottom_top(state, state, state, bottom_layers=4)


def test_bottom_layers_on_real_models_with_a_detail_branch() -> None:
    from hpc_multires.models import build_model
    from hpc_multires.plan.config import ModelConfig

    cfg = ModelConfig(name="neuron_inverter", width=0.125, head="flatten", fc_sizes=(8,),
                      stem_level=2, stem_detail=True)
    coarse = build_model(cfg, (4, 400), 3, 2).state_dict()
    fine = build_model(cfg, (4, 800), 3, 1).state_dict()
    assert next(iter(fine)).startswith("detail.") and not any(k.startswith("detail.")
                                                              for k in coarse)
    stem, second = check_bottom_layers(coarse, fine, 2)
    assert stem.startswith("features.") and second.startswith("features.")
    out = bottom_top(coarse, {k: torch.zeros_like(v) for k, v in fine.items()}, fine,
                     bottom_layers=2)
    torch.testing.assert_close(out[f"{second}.weight"], coarse[f"{second}.weight"])
    assert all(out[k].abs().sum() == 0 for k in fine if k.startswith(("detail.", "head.")))


def test_shrink_mixes_float_entries_with_the_fresh_model() -> None:
    fused = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(7)}
    fresh = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(0)}
    out = shrink(fused, fresh, keep=0.25)
    assert out["w"].tolist() == [1.0, 5.0]
    assert int(out["n"]) == 7  # counters such as BatchNorm's are not mixed
    assert shrink(fused, fresh, keep=1.0)["w"].tolist() == [4.0, 8.0]
    assert fused["w"].tolist() == [4.0, 8.0]  # inputs untouched
    with pytest.raises(ValueError, match="keep = -0.1"):
        shrink(fused, fresh, keep=-0.1)


@pytest.mark.parametrize("name,shape0", [("cosmoflow", (2, 16, 16, 16)),
                                         ("neuron_inverter", (4, 1600))])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_prolong_finds_the_dense_layer_behind_dropout(name: str, shape0: tuple[int, ...],
                                                      dropout: float) -> None:
    """The networks name the dense layer that reads the flattened features; with dropout in
    the head it is not the head's second module, and prolong must still find it."""
    from hpc_multires.models import build_model
    from hpc_multires.plan.config import ModelConfig

    cfg = ModelConfig(name=name, width=0.125, depth=3, conv_channels=(30, 90, 180), pool=4,
                      head="flatten", fc_sizes=(8,), dropout=dropout)
    fine = build_model(cfg, shape0, 3, 0)
    coarse = build_model(cfg, (shape0[0], *(s // 2 for s in shape0[1:])), 3, 1)
    fine_shapes, coarse_shapes = fine.dense_input_shapes(), coarse.dense_input_shapes()
    assert fine_shapes.keys() == coarse_shapes.keys() and len(fine_shapes) == 1
    (layer,) = fine_shapes
    state = coarse.state_dict()
    assert layer in state and state[layer].shape[1] == math.prod(coarse_shapes[layer])
    out = prolong(state, fine.state_dict(), {layer: (coarse_shapes[layer], fine_shapes[layer][1:])})
    torch.testing.assert_close(out[layer], prolong_dense(state[layer], coarse_shapes[layer],
                                                         fine_shapes[layer][1:]))
