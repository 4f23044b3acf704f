"""The objective seam: what a step computes, apart from the loop that runs it."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_arrays_store
from torch import nn

from hpc_multires.comm.dist import Comm
from hpc_multires.comm.ranks import RankInfo
from hpc_multires.data.config import DataConfig
from hpc_multires.data.sampler import GlobalBatchSampler
from hpc_multires.data.store import SampleStore
from hpc_multires.errors import ConfigError
from hpc_multires.train.config import LogConfig, TrainConfig
from hpc_multires.train.loop import Split, Trainer
from hpc_multires.train.metrics import MetricsLog, Progress
from hpc_multires.train.objective import (
    Batch,
    BatchRequest,
    Objective,
    Regression,
    StepLoss,
    whole_sample_prediction,
)
from hpc_multires.train.spec import RunSettings, StageSpec


class Fixed(nn.Module):
    """Predicts given values whatever the input: (b, P)."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out[: len(x)]


class Peak(nn.Module):
    """Each channel's maximum over the sample (b, C, H, W) -> (b, C): not linear, so the
    mean over windows differs from the whole sample's value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


def test_regression_loss_is_the_mean_squared_error() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    out = Regression().loss(model, [Batch(0, x, y, np.arange(4))], step=7)
    assert out.logged == {}
    expected = ((model(x) - y) ** 2).sum() / 8  # 4 samples x 2 labels
    assert torch.allclose(out.loss, expected)
    assert torch.equal(out.loss, nn.functional.mse_loss(model(x), y))
    out.loss.backward()  # the loss carries the graph
    assert model.weight.grad is not None


def test_regression_validation_is_mae_and_mse_per_label() -> None:
    pred = torch.tensor([[1.0, 0.0], [2.0, 4.0], [0.0, 1.0]])  # (3, 2)
    y = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # errors: label a: 1, 2, -1; label b: 0, 3, 0
    metrics = Regression().validation(["a", "b"], crop=0)
    x = torch.zeros(3, 1, 2, 2)
    metrics.add(Fixed(pred[:2]), Batch(0, x[:2], y[:2], np.arange(2)))
    metrics.add(Fixed(pred[2:]), Batch(0, x[2:], y[2:], np.arange(2, 3)))
    result = metrics.result(metrics.sums())
    assert result["val_mae/a"] == pytest.approx(4 / 3)
    assert result["val_mae/b"] == pytest.approx(3 / 3)
    assert result["val_mae"] == pytest.approx(7 / 6)
    assert result["val_mse"] == pytest.approx((1 + 4 + 1 + 9) / 6)
    # Two ranks' sums added up give the same metrics as one rank's: exact over ranks.
    first, second = Regression().validation(["a", "b"], 0), Regression().validation(["a", "b"], 0)
    first.add(Fixed(pred[:2]), Batch(0, x[:2], y[:2], np.arange(2)))
    second.add(Fixed(pred[2:]), Batch(0, x[2:], y[2:], np.arange(2, 3)))
    added = [a + b for a, b in zip(first.sums(), second.sums(), strict=True)]
    assert first.result(added) == result
    # A rank with no batch still gives sums of the right length.
    empty = Regression().validation(["a", "b"], 0)
    assert empty.sums() == [0.0, 0.0, 0.0, 0.0]
    assert empty.result([0.0, 0.0, 0.0, 0.0])["val_mae"] == 0.0


def test_regression_validation_on_windows_averages_the_tiles() -> None:
    """A stage with a crop is validated on the mean prediction over the disjoint windows
    that tile each sample."""
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    x[1] = x[1].flip(-1) ** 2 / 10
    y = torch.tensor([[3.0], [-1.0]])
    tile_maxima = [[x[i, 0, a:a + 2, b:b + 2].max() for a in (0, 2) for b in (0, 2)]
                   for i in range(2)]
    expected = torch.tensor([[sum(m) / 4] for m in tile_maxima])  # (2, 1)
    assert torch.allclose(whole_sample_prediction(Peak(), x, crop=2), expected)
    assert not torch.allclose(whole_sample_prediction(Peak(), x, crop=0), expected)
    metrics = Regression().validation(["p"], crop=2)
    metrics.add(Peak(), Batch(0, x, y, np.arange(2)))
    err = (expected - y)[:, 0]
    result = metrics.result(metrics.sums())
    assert result["val_mae"] == pytest.approx(float(err.abs().mean()))
    assert result["val_mse"] == pytest.approx(float(err.square().mean()))


class L1(Regression):
    """Mean absolute error; logs the mean squared error beside it."""

    def loss(self, model: nn.Module, batches: Sequence[Batch], step: int) -> StepLoss:
        (batch,) = batches
        out = model(batch.x)
        return StepLoss(nn.functional.l1_loss(out, batch.y),
                        {"mse": nn.functional.mse_loss(out, batch.y).detach()})


class TwoLevels(Regression):
    def requests(self, level: int, global_batch: int) -> list[BatchRequest]:
        return [BatchRequest(level, global_batch), BatchRequest(level + 1, 2 * global_batch)]


def one_process() -> Comm:
    return Comm(RankInfo(rank=0, world_size=1, local_rank=0, local_size=1, node_index=0,
                         node_count=1, launcher="single"), torch.device("cpu"))


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(24, 1, 4, 4, 4)).astype(np.float32)
    y = rng.uniform(-1, 1, size=(24, 2)).astype(np.float32)
    return write_arrays_store(tmp_path_factory.mktemp("objective") / "data", x, y)


def train_one_epoch(store_path: Path, run_dir: Path, objective: Objective | None,
                    model: nn.Module) -> list[dict]:
    store = SampleStore(store_path)
    run_dir.mkdir()
    stage = StageSpec(name="s", level=0, group="all", ranks=(0,),
                      train=TrainConfig(epochs=1, global_batch=4, lr=0.05))
    run = RunSettings(seed=3, data=DataConfig(num_workers=0), log=LogConfig(every_steps=1),
                      config_record={"anything": "stored as it is"})
    t0 = time.monotonic()
    trainer = Trainer(stage, run, one_process(), model, Split(store, np.arange(16)),
                      Split(store, np.arange(16, 24)), run_dir / "checkpoints",
                      MetricsLog(run_dir / "metrics.jsonl", enabled=True),
                      Progress(4, enabled=False, interval_s=30.0),
                      lambda: time.monotonic() - t0, objective=objective)
    result = trainer.fit()
    assert result["done"] and result["step"] == 4
    ckpt = torch.load(run_dir / "checkpoints" / "epoch-0001.pt", weights_only=False)
    assert ckpt["config"] == {"anything": "stored as it is"}
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_custom_objective_changes_what_is_trained(small_store: Path, tmp_path: Path) -> None:
    """The Trainer trains whatever loss its objective builds: the L1 objective's first
    logged loss is the L1 loss of the initial model on the first batch, not the MSE, and
    its extra scalar reaches the step records."""
    torch.manual_seed(0)
    initial = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    store = SampleStore(small_store)
    first = GlobalBatchSampler(np.arange(16), 4, 0, 1, seed=3).batches(0)[0]
    x = torch.as_tensor(np.stack([store.read(int(i))[0] for i in first]))  # (4, 1, 4, 4, 4)
    y = torch.as_tensor(np.stack([store.read(int(i))[1] for i in first]))  # (4, 2)
    with torch.no_grad():
        l1 = float(nn.functional.l1_loss(initial(x), y))
        mse = float(nn.functional.mse_loss(initial(x), y))
    assert abs(l1 - mse) > 1e-3

    l1_model, mse_model = copy.deepcopy(initial), copy.deepcopy(initial)
    by_l1 = train_one_epoch(small_store, tmp_path / "l1", L1(), l1_model)
    by_mse = train_one_epoch(small_store, tmp_path / "mse", None, mse_model)  # Regression
    l1_steps = [r for r in by_l1 if r["kind"] == "step"]
    mse_steps = [r for r in by_mse if r["kind"] == "step"]
    assert l1_steps[0]["loss"] == pytest.approx(l1, rel=1e-6)
    assert l1_steps[0]["mse"] == pytest.approx(mse, rel=1e-6)
    assert mse_steps[0]["loss"] == pytest.approx(mse, rel=1e-6)
    assert "mse" not in mse_steps[0]
    assert any(not torch.equal(a, b) for a, b in zip(l1_model.parameters(),
                                                     mse_model.parameters(), strict=True))
    # Both are validated by the regression metrics, and the start record has its reference.
    for records in (by_l1, by_mse):
        (epoch,) = [r for r in records if r["kind"] == "epoch"]
        assert {"val_mae", "val_mse", "val_mae/y0", "val_mae/y1"} <= epoch.keys()
        assert "val_mae_mean_predictor" in records[0]


class CoarseFirst(Regression):
    def requests(self, level: int, global_batch: int) -> list[BatchRequest]:
        return [BatchRequest(level + 1, global_batch)]


class OddBatch(Regression):
    def requests(self, level: int, global_batch: int) -> list[BatchRequest]:
        return [BatchRequest(level, global_batch), BatchRequest(level, 3)]


def test_requests_the_loop_cannot_read_are_refused(small_store: Path, tmp_path: Path) -> None:
    """A level the trainer has no training split of, a first request other than the stage's
    own (it sets the epoch), a batch the stage's ranks do not divide."""
    store = SampleStore(small_store)

    def trainer(objective: Objective, ranks: int = 1) -> Trainer:
        # Only the construction runs (it refuses before any collective): rank 0 of `ranks`.
        comm = Comm(RankInfo(rank=0, world_size=ranks, local_rank=0, local_size=ranks,
                             node_index=0, node_count=1, launcher="single"),
                    torch.device("cpu"))
        return Trainer(StageSpec(name="s", level=0, group="all", ranks=tuple(range(ranks)),
                                 train=TrainConfig(global_batch=4)),
                       RunSettings(seed=0), comm, nn.Linear(1, 1),
                       Split(store, np.arange(16)), Split(store, np.arange(16, 24)), tmp_path,
                       MetricsLog(tmp_path / "m.jsonl", enabled=False),
                       Progress(1, enabled=False, interval_s=30.0), time.monotonic,
                       objective=objective)

    with pytest.raises(ValueError, match=r"reads level 1, but the trainer has training data "
                                         r"of levels \[0\] only"):
        trainer(TwoLevels())
    with pytest.raises(ValueError, match="must be the stage's own"):
        trainer(CoarseFirst())
    with pytest.raises(ConfigError, match="3 samples at level 0 is not divisible by the "
                                          "stage's 2 ranks"):
        trainer(OddBatch(), ranks=2)
