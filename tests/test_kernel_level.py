"""model.kernel_level: level-consistent networks, and stages that share one schedule."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hpc_multires.errors import ConfigError
from hpc_multires.methods.fusion import prolong
from hpc_multires.models import build_model
from hpc_multires.plan.config import ModelConfig, TrainConfig
from hpc_multires.plan.load import config_from_dict
from hpc_multires.train.optim import learning_rate

NEURON = ModelConfig(name="neuron_inverter", width=0.2, conv_channels=(30, 90), pool=4,
                     head="flatten", fc_sizes=(16,), pool_type="avg", kernel_level=1)
COSMO = ModelConfig(name="cosmoflow", width=0.125, depth=4, head="flatten", fc_sizes=(8,),
                    pool_type="avg", kernel_level=1)


def _pair(cfg: ModelConfig, shape0: tuple[int, ...], level: int = 1):
    torch.manual_seed(0)
    coarse_shape = (shape0[0], *(s >> level for s in shape0[1:]))
    coarse = build_model(cfg, coarse_shape, 3, level)
    fine = build_model(cfg, shape0, 3, 0)
    shapes, fine_shapes = coarse.dense_input_shapes(), fine.dense_input_shapes()
    dense = {n: (s, fine_shapes[n][1:]) for n, s in shapes.items()}
    fine.load_state_dict(prolong(coarse.state_dict(), fine.state_dict(), dense, sampled=True))
    return coarse, fine


@pytest.mark.parametrize(("cfg", "shape0"), [(NEURON, (4, 1600)), (COSMO, (2, 32, 32, 32))])
def test_maps_keep_their_level_size(cfg: ModelConfig, shape0: tuple[int, ...]) -> None:
    plain = build_model(dataclasses.replace(cfg, kernel_level=0), shape0, 3, 0)
    fine = build_model(cfg, shape0, 3, 0)
    convs = [m for m in fine.features if isinstance(m, torch.nn.Conv1d | torch.nn.Conv3d)]
    assert convs[0].kernel_size[0] == 2 * cfg.kernel_size  # twice the taps, point for point
    assert all(c.dilation[0] == 2 and c.kernel_size[0] == cfg.kernel_size for c in convs[1:])
    # The maps are those of the plain network on level 0, so level 0 costs what it holds...
    x = torch.randn(1, *shape0)
    assert fine.features(x).shape == plain.features(x).shape
    # ...and on its own level the network is the plain one.
    coarse_shape = (shape0[0], *(s // 2 for s in shape0[1:]))
    coarse = build_model(cfg, coarse_shape, 3, 1)
    plain1 = build_model(dataclasses.replace(cfg, kernel_level=0), coarse_shape, 3, 1)
    assert [type(m) for m in coarse.features] == [type(m) for m in plain1.features]
    assert coarse.state_dict().keys() == fine.state_dict().keys()


def test_moved_model_computes_the_coarse_function_exactly_without_pooling() -> None:
    # With no pooling every map point is kept, so the level-0 network computes at each even
    # point exactly what the level-1 network computes from the level-1 sample (the pair
    # averages): first convolution resampled, later ones dilated, dense layer sampled.
    cfg = dataclasses.replace(NEURON, pool=1, width=1.0, conv_channels=(6, 8, 8))
    coarse, fine = _pair(cfg, (4, 64))
    x = 10 * torch.randn(5, 4, 64)
    with torch.no_grad():
        want = coarse(F.avg_pool1d(x, 2))
        got = fine(x)
    assert (want - want.mean(0)).abs().mean() > 1e-2  # the output depends on the input
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # The plain prolongation (dense weight spread over both points of a pair) is not exact.
    shapes = coarse.dense_input_shapes()
    dense = {n: (s, fine.dense_input_shapes()[n][1:]) for n, s in shapes.items()}
    fine.load_state_dict(prolong(coarse.state_dict(), fine.state_dict(), dense))
    with torch.no_grad():
        assert (fine(x) - want).abs().max() > 1e-3


@pytest.mark.parametrize(("cfg", "shape0", "pool"), [(NEURON, (4, 1600), F.avg_pool1d),
                                                     (COSMO, (2, 32, 32, 32), F.avg_pool3d)])
def test_first_block_is_exact_and_the_whole_model_close(cfg, shape0, pool) -> None:
    coarse, fine = _pair(cfg, shape0)
    x = torch.randn(4, *shape0)
    xc = pool(x, 2)
    with torch.no_grad():
        # First convolution and activation: exact at every other point on every axis.
        n_first = 3 if cfg.name == "neuron_inverter" else 2  # (pad,) conv, activation
        h_fine = fine.features[:n_first](x)
        h_coarse = coarse.features[:n_first](xc)
        every_other = (slice(None), slice(None)) + (slice(None, None, 2),) * (x.dim() - 2)
        torch.testing.assert_close(h_fine[every_other], h_coarse, rtol=1e-4, atol=1e-5)
        # With pooling the wider windows also read the points in between, so the moved
        # model is close to, not equal to, the coarse one; far closer than a fresh one.
        want = coarse(xc)
        moved = (fine(x) - want).abs().mean()
        fresh = build_model(cfg, shape0, 3, 0)
        assert moved < 0.5 * (fresh(x) - want).abs().mean()


def test_kernel_level_config_checks() -> None:
    config_from_dict({"model": {"kernel_level": 1, "pool_type": "avg"}})
    with pytest.raises(ConfigError, match="model.kernel_level alone"):
        config_from_dict({"model": {"kernel_level": 1, "stem_level": 1}})
    with pytest.raises(ConfigError, match="model.kernel_level alone"):
        config_from_dict({"model": {"kernel_level": 1, "coarse_pools": "drop"}})
    with pytest.raises(ConfigError, match="model.kernel_level"):
        config_from_dict({"model": {"kernel_level": 5}})
    with pytest.raises(ConfigError, match="pool_type"):
        config_from_dict({"model": {"pool_type": "mean"}})


def test_stages_share_one_schedule() -> None:
    # A 10-epoch stage and a 3-epoch stage laid over one 13-epoch schedule follow the same
    # rates, step for step, as one 13-epoch run: no second warm-up at the change of level.
    spe = 7
    whole = TrainConfig(epochs=13, warmup_epochs=1, lr=1e-3)
    first = dataclasses.replace(whole, epochs=10, schedule_epochs=13)
    second = dataclasses.replace(whole, epochs=3, schedule_epochs=13, schedule_offset=10)
    want = [learning_rate(whole, s, 13 * spe, spe) for s in range(13 * spe)]
    got = ([learning_rate(first, s, 10 * spe, spe) for s in range(10 * spe)]
           + [learning_rate(second, s, 3 * spe, spe) for s in range(3 * spe)])
    assert got == pytest.approx(want)
    # Without the shared schedule the second stage climbs back to the peak rate.
    alone = dataclasses.replace(whole, epochs=3)
    assert max(learning_rate(alone, s, 3 * spe, spe) for s in range(3 * spe)) > 5 * want[70]


def test_a_fractional_schedule_tail_never_runs_past_its_end() -> None:
    # Offset and length round separately (0.5 x 3 and 1.5 x 3 steps): the last step of the
    # tail must still sit on the schedule, not past it (a negative rate on a linear decay).
    tail = TrainConfig(epochs=1, warmup_epochs=0, lr=1e-3, schedule="linear",
                       schedule_epochs=1.5, schedule_offset=0.5)
    for spe in (3, 5, 7):
        rates = [learning_rate(tail, s, spe, spe) for s in range(spe)]
        floor = tail.lr * tail.min_lr_ratio
        assert all(floor - 1e-12 <= r <= tail.lr for r in rates), (spe, rates)


def test_schedule_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="schedule_offset"):
        config_from_dict({"train": {"epochs": 3, "schedule_offset": 2}})
    with pytest.raises(ConfigError, match="schedule_epochs"):
        config_from_dict({"train": {"epochs": 4, "schedule_epochs": 13,
                                    "schedule_offset": 10}})
    config_from_dict({"train": {"epochs": 3, "schedule_epochs": 13, "schedule_offset": 10}})


MRT_LEVEL = """
[run]
seed = 4
[data]
path = "{data}"
val_fraction = 0.25
num_workers = 0
[model]
name = "neuron_inverter"
width = 1.0
conv_channels = [6, 8]
kernel_size = 4
pool = 1
head = "flatten"
fc_sizes = [16]
pool_type = "avg"
kernel_level = 1
[train]
global_batch = 8
lr = 2e-3
warmup_epochs = 1
[log]
every_steps = 1
[[stages]]
name = "coarse1"
level = 1
[stages.train]
epochs = 2
schedule_epochs = 3
[[stages]]
name = "fine"
level = 0
init = "fuse"
fuse_from = ["coarse1"]
fusion = "prolong"
[stages.train]
epochs = 1
schedule_epochs = 3
schedule_offset = 2
"""


@pytest.mark.slow
def test_train_moves_a_level_consistent_model_exactly(cli, tmp_path) -> None:
    # Traces constant over each pair of bins: level 1 (the pair averages) holds the same
    # values, so both levels are normalised alike and, with no pooling, the model moved to
    # level 0 by the driver must score exactly what the coarse model scored on level 1.
    import json

    import numpy as np
    from conftest import write_arrays_store

    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(48, 4, 32)).astype(np.float32), 2, axis=-1)
    y = rng.uniform(-1, 1, size=(48, 3)).astype(np.float32)
    data = write_arrays_store(tmp_path / "data", x, y, per_shard=16)
    assert cli(["data", "pyramid", str(data), "--levels", "1"]).returncode == 0
    config = tmp_path / "mrt.toml"
    config.write_text(MRT_LEVEL.format(data=data))
    r = cli(["train", str(config), "--run-dir", str(tmp_path / "run")])
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    coarse_end = [r for r in recs if r["kind"] == "epoch" and r["stage"] == "coarse1"][-1]
    fine_start = next(r for r in recs if r["kind"] == "start" and r["stage"] == "fine")
    assert fine_start["sample_shape"] == [4, 64]
    assert fine_start["start_val_mae"] == pytest.approx(coarse_end["val_mae"], rel=1e-4)
    # One schedule: the two stages' rates are those of one 3-epoch run, step for step.
    lrs = {s: [r["lr"] for r in recs if r["kind"] == "step" and r["stage"] == s]
           for s in ("coarse1", "fine")}
    spe = len(lrs["fine"])
    whole = TrainConfig(epochs=3, warmup_epochs=1, lr=2e-3)
    assert lrs["coarse1"] + lrs["fine"] == pytest.approx(
        [learning_rate(whole, s, 3 * spe, spe) for s in range(3 * spe)])
