"""Classification as an objective: the class of each sample, from the model's class logits.

The store's one label column holds each sample's class index (0 .. K-1, stored as
float32 and not scaled; the schema's `class_names` name them), and the model outputs K
logits (b, K) with no final activation: the softmax is inside the loss. The loss is the
cross-entropy (with `task.label_smoothing` if asked). Validation reports, over the whole
validation set and exact whatever the rank count:

- `val_acc`, the headline (higher is better): the fraction of samples whose largest logit
  is their class;
- `val_loss`: the mean cross-entropy (without smoothing);
- `val_acc/<class name>`: the accuracy on each class's samples (recall), 0 for a class
  with no validation sample.

A stage with windows (`crop`) validates on whole samples by averaging its logits over the
windows that tile each sample. The start record names what always predicting the training
set's most frequent class scores (`val_acc_majority`), the floor a model must beat.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpc_multires.train.objective import (
    Batch,
    Objective,
    StepLoss,
    Validation,
    whole_sample_prediction,
)


def class_indices(y: torch.Tensor) -> torch.Tensor:
    """A batch's stored labels (b, 1), class indices as floats, as int64 classes (b,)."""
    return y[:, 0].round().long()


def class_counts(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Samples per class (K,) of stored labels (N, 1)."""
    return np.bincount(np.rint(y[:, 0]).astype(np.int64), minlength=num_classes)


class Classification(Objective):
    """Cross-entropy of class logits; validated by accuracy (overall and per class)."""

    headline = "val_acc"
    higher_is_better = True

    def __init__(self, class_names: Sequence[str], label_smoothing: float = 0.0) -> None:
        self.class_names = tuple(class_names)
        self.label_smoothing = label_smoothing

    def criterion(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # prediction: (b, K) logits; target: (b, 1) stored class indices
        return F.cross_entropy(prediction, class_indices(target),
                               label_smoothing=self.label_smoothing)

    def loss(self, model: nn.Module, batches: Sequence[Batch], step: int) -> StepLoss:
        (batch,) = batches
        return StepLoss(self.criterion(model(batch.x), batch.y), {})

    def validation(self, label_names: Sequence[str], crop: int) -> Validation:
        return ClassificationValidation(self.class_names, crop)

    def reference(self, train_y: np.ndarray, val_y: np.ndarray) -> dict[str, float]:
        # Always predicting the training set's most frequent class.
        k = len(self.class_names)
        majority = int(class_counts(train_y, k).argmax()) if len(train_y) else 0
        share = float(class_counts(val_y, k)[majority] / max(len(val_y), 1))
        return {"val_acc_majority": share}


class ClassificationValidation(Validation):
    """Correct predictions and cross-entropy, summed over samples, and per class."""

    def __init__(self, class_names: Sequence[str], crop: int) -> None:
        self.names = list(class_names)
        self.crop = crop
        k = len(self.names)
        self.correct = np.zeros(k)  # (K,) correct predictions per true class
        self.total = np.zeros(k)  # (K,) samples per true class
        self.loss_sum = 0.0

    def add(self, model: nn.Module, batch: Batch) -> None:
        logits = whole_sample_prediction(model, batch.x, self.crop)  # (b, K)
        target = class_indices(batch.y)  # (b,)
        self.loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        k = len(self.names)
        hit = (logits.argmax(dim=1) == target).double()  # (b,)
        self.correct += torch.zeros(k, dtype=torch.float64, device=hit.device) \
            .index_add_(0, target, hit).cpu().numpy()
        self.total += torch.bincount(target, minlength=k).double().cpu().numpy()

    def sums(self) -> list[float]:
        return [*self.correct.tolist(), *self.total.tolist(), self.loss_sum]

    def result(self, sums: list[float]) -> dict[str, float]:
        k = len(self.names)
        correct, total, loss_sum = np.array(sums[:k]), np.array(sums[k:2 * k]), sums[-1]
        n = max(float(total.sum()), 1.0)
        return {"val_acc": float(correct.sum()) / n, "val_loss": loss_sum / n,
                **{f"val_acc/{name}": float(c / t) if t else 0.0
                   for name, c, t in zip(self.names, correct, total, strict=True)}}
