"""What a training step computes: the objective (estimator) a stage trains with.

The loop owns the mechanics (reading, the optimizer, the stop vote, checkpoints); the
objective owns the arithmetic: which batches one step reads, the loss built from them,
and the validation metrics. A new estimator is a new `Objective`, not a new loop.

Per step, the loop asks `objective.requests(level, global_batch)` what to read (a list of
`BatchRequest`: a pyramid level and a global batch, each split evenly over the stage's
ranks), reads this rank's share of each, and calls `objective.loss(model, batches, step)`
for the tensor it differentiates. Validation runs over the whole validation set at the
stage's level: the loop feeds each of this rank's batches to a `Validation` accumulator,
sums its `sums()` over the stage's ranks, and `result(sums)` names the metrics.

The objectives:

- `Regression` (here): the labels by MSE, validated by MAE;
- `Restoration` (`restoration.py`): the image tasks. `corruption(epoch)` tells the reader
  to corrupt the clean images it reads (in the reader processes, from (seed, sample index)
  alone, so a sample is corrupted alike at every level and on every rank count); the
  batch's x is the corrupted image, its y the clean one; validated by PSNR and SSIM;
- the multiscale gradient estimator (`methods/mge.py`, above this layer): `requests`
  returns one request per level, each with its own global batch (say 16 at level 0, 32
  at level 1), and `loss` forms L_K(batch_K) + sum_l [L_l(batch_l) - L_{l+1}(restrict(
  batch_l))] with the `criterion` of the objective it wraps.

The loop reads every request: the first is the stage's level with its global batch and
sets the epoch (its sampler's steps per epoch); each request has its own sampler, a draw of
its own from (seed, epoch, request), over the training split of the request's level, which
the driver hands the trainer. Dynamic downsampling fits too: `loss` decides from (seed,
step) alone whether this step runs on restricted inputs, so a resumed step decides as the
straight run did.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from hpc_multires.data.crop import tiles
from hpc_multires.data.loader import ReadCorruption
from hpc_multires.errors import ConfigError


@dataclass(frozen=True)
class BatchRequest:
    """One batch a step reads: `global_batch` samples of pyramid `level`, split evenly over
    the stage's ranks (each rank reads global_batch / ranks of them)."""

    level: int
    global_batch: int


@dataclass(frozen=True)
class Batch:
    """This rank's share of one request, on the training device."""

    level: int  # the pyramid level it was read at
    x: torch.Tensor  # (b, C, *spatial) inputs (windows, for a stage with a crop)
    y: torch.Tensor  # (b, P) labels, or (b, C, *spatial) clean images for an image task
    indices: np.ndarray  # (b,) sample indices in the store: per-sample seeds come from these


class StepLoss(NamedTuple):
    """What one step of an objective yields on this rank."""

    loss: torch.Tensor
    """() the value backward() differentiates: this rank's mean over its samples (DDP
    averages the gradients over ranks, so the step follows the global batch's mean)."""
    logged: dict[str, torch.Tensor]
    """() each: more scalars for the step records, by name, left on the device (the loop
    averages them over ranks on its log steps only, where it pays a sync anyway)."""


class Validation(ABC):
    """Metrics over this rank's share of the validation set, as sums the loop adds up over
    the stage's ranks: exact whatever the number of ranks."""

    @abstractmethod
    def add(self, model: nn.Module, batch: Batch) -> None:
        """Run `model` on one batch (in eval mode, without gradients) and add it in."""

    @abstractmethod
    def sums(self) -> list[float]:
        """This rank's sums, the same count on every rank (a rank with no batch too)."""

    @abstractmethod
    def result(self, sums: list[float]) -> dict[str, float]:
        """The metrics, named `val_*`, from the sums over every rank."""


class Objective(ABC):
    """What a step computes: the batches it reads, its loss, and its validation metrics."""

    headline: str = "val_mae"
    """The validation metric progress lines, the report and the benchmarks show; a key of
    `Validation.result`."""
    higher_is_better: bool = False
    """Whether a larger headline is better (PSNR) or a smaller one (MAE)."""

    def requests(self, level: int, global_batch: int) -> list[BatchRequest]:
        """The batches one step reads, for a stage at `level` with `global_batch`; the first
        is (level, global_batch), which sets the stage's steps per epoch."""
        return [BatchRequest(level, global_batch)]

    def criterion(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch's prediction against its target: () (the per-level loss
        an estimator over several levels combines)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-batch criterion")

    def corruption(self, epoch: int | None) -> ReadCorruption | None:
        """What the reader does to the samples it reads for training epoch `epoch` (None:
        validation); None: nothing, the normalised samples and their labels."""
        return None

    def step_work(self, requests: Sequence[BatchRequest], dims: int) -> float:
        """Work of one step in level-0 samples (a level-L sample costs 2^(-dims L) of one),
        forward passes counted: the unit of the benchmarks' fine-level-equivalent work."""
        return float(sum(r.global_batch * 2.0 ** (-dims * r.level) for r in requests))

    @abstractmethod
    def loss(self, model: nn.Module, batches: Sequence[Batch], step: int) -> StepLoss:
        """The loss of step `step` (counted in the stage from 0) on this rank's `batches`,
        one per request, in the order `requests` gave them."""

    @abstractmethod
    def validation(self, label_names: Sequence[str], crop: int) -> Validation:
        """An empty accumulator for one pass over the validation set; `crop`: the stage's
        window size (0: it trains on whole samples)."""

    def reference(self, train_y: np.ndarray, val_y: np.ndarray) -> dict[str, float]:
        """What a trivial predictor scores, from the labels alone (train_y (N, P), val_y
        (M, P)); logged in the stage's start record."""
        return {}


def check_requests(requests: Sequence[BatchRequest], level: int, global_batch: int,
                   levels: Sequence[int], ranks: int) -> None:
    """Refuse what the loop cannot read: a first request other than the stage's own level
    and global batch (it sets the epoch), a level the trainer was given no training split
    of (`levels`), or a global batch the stage's `ranks` do not divide."""
    if not requests or requests[0] != BatchRequest(level, global_batch):
        raise ValueError(
            f"the first batch a step reads must be the stage's own (level {level}, global "
            f"batch {global_batch}), which sets its epoch; the objective asked for "
            f"{list(requests)}")
    for r in requests:
        if r.level not in levels:
            raise ValueError(f"the objective reads level {r.level}, but the trainer has "
                             f"training data of levels {sorted(levels)} only")
        if r.global_batch % ranks:
            raise ConfigError(
                f"a batch of {r.global_batch} samples at level {r.level} is not divisible by "
                f"the stage's {ranks} ranks; choose batch sizes (train.global_batch, "
                "train.mge_growth) that every level's batch divides evenly")


def whole_sample_prediction(model: nn.Module, x: torch.Tensor, crop: int) -> torch.Tensor:
    """The model's prediction for whole samples x (b, C, *spatial): for a stage that trains
    on windows of `crop` points, the mean over the disjoint windows that tile each sample
    (its model was never shown a whole sample); (b, P)."""
    if not crop:
        return model(x)
    return torch.stack([model(t) for t in tiles(x, crop)]).mean(dim=0)


class Regression(Objective):
    """Labels regressed with the mean squared error; validated by MAE (overall and per
    label) and MSE."""

    def criterion(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(prediction, target)

    def loss(self, model: nn.Module, batches: Sequence[Batch], step: int) -> StepLoss:
        (batch,) = batches
        return StepLoss(self.criterion(model(batch.x), batch.y), {})

    def validation(self, label_names: Sequence[str], crop: int) -> Validation:
        return RegressionValidation(label_names, crop)

    def reference(self, train_y: np.ndarray, val_y: np.ndarray) -> dict[str, float]:
        # Predicting the training mean: a model must beat it to have learned anything.
        return {"val_mae_mean_predictor": float(np.abs(val_y - train_y.mean(axis=0)).mean())}


class RegressionValidation(Validation):
    """Absolute errors per label and the squared error, summed over samples."""

    def __init__(self, label_names: Sequence[str], crop: int) -> None:
        self.names = list(label_names)
        self.crop = crop
        self.abs_sum = np.zeros(len(self.names))  # (P,)
        self.sq_sum = 0.0
        self.rows = 0.0

    def add(self, model: nn.Module, batch: Batch) -> None:
        err = whole_sample_prediction(model, batch.x, self.crop) - batch.y  # (b, P)
        self.abs_sum += err.abs().sum(dim=0).double().cpu().numpy()
        self.sq_sum += float(err.square().sum())
        self.rows += err.shape[0]

    def sums(self) -> list[float]:
        return [*self.abs_sum.tolist(), self.sq_sum, self.rows]

    def result(self, sums: list[float]) -> dict[str, float]:
        *abs_total, sq_sum, rows = sums
        rows = max(rows, 1)
        names = self.names
        return {"val_mae": sum(abs_total) / (rows * len(names)),
                "val_mse": sq_sum / (rows * len(names)),
                **{f"val_mae/{n}": a / rows for n, a in zip(names, abs_total, strict=True)}}
