"""Image restoration as an objective: a clean image from a corrupted one.

The reader corrupts the clean images it reads (`data/corrupt.py`, in the reader processes):
a training epoch's corruptions follow from (run seed, epoch, sample index), so every epoch
shows each image with a fresh corruption, and the validation set's from a fixed seed
(`task.val_seed`), so every epoch and every run is validated on the same corrupted images.
The batch's x is the corrupted image, its y the clean one.

The loss is the MSE of the restored image, plus `ssim_weight` * (1 - SSIM) if asked. The
validation scores the restored image clipped to [0, 1] (the range of the images) and
reports, averaged over images: `val_psnr` (the headline, higher is better; each
image's PSNR is capped at `PSNR_CAP` dB so that one perfect image cannot make the mean
infinite), `val_ssim`, `val_mse` (per pixel), and `val_psnr_input`, the PSNR of the
corrupted input itself (brought to the target's size for a half-size super-resolution
input): what a model that changes nothing would score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpc_multires.data.corrupt import Corruption
from hpc_multires.data.loader import ReadCorruption
from hpc_multires.train.image_metrics import psnr, ssim
from hpc_multires.train.objective import Batch, Objective, StepLoss, Validation

PSNR_CAP = 100.0  # dB: an image restored exactly (MSE 0) counts as this


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """SSIM's Gaussian window for images of this size: 11 taps of standard deviation 1.5
    (Wang et al.), narrowed to the largest odd size the image holds, its width scaled alike,
    for the small images of coarse pyramid levels."""
    size = min(11, height, width)
    size -= 1 - size % 2  # odd
    return size, 1.5 * size / 11


def image_ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM per image (B,) with the window `ssim_window` gives for their size."""
    size, sigma = ssim_window(*pred.shape[-2:])
    return ssim(pred, target, window_size=size, sigma=sigma)


def epoch_seed(seed: int, epoch: int) -> int:
    """The corruption seed of training epoch `epoch` of a run with `seed`."""
    return int(np.random.SeedSequence([seed, epoch, 0x1ADE]).generate_state(1)[0])


class Restoration(Objective):
    """The image tasks: MSE (and optionally 1 - SSIM) of the restored image; validated by
    PSNR, SSIM and MSE."""

    headline = "val_psnr"
    higher_is_better = True

    def __init__(self, spec: Corruption, seed: int, val_seed: int,
                 ssim_weight: float = 0.0) -> None:
        self.spec = spec
        self.seed = seed
        self.val_seed = val_seed
        self.ssim_weight = ssim_weight

    def corruption(self, epoch: int | None) -> ReadCorruption:
        return ReadCorruption(self.spec, self.val_seed if epoch is None
                              else epoch_seed(self.seed, epoch))

    def criterion(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.mse_loss(prediction, target)
        if self.ssim_weight:
            loss = loss + self.ssim_weight * (1.0 - image_ssim(prediction, target).mean())
        return loss

    def loss(self, model: nn.Module, batches: Sequence[Batch], step: int) -> StepLoss:
        (batch,) = batches
        return StepLoss(self.criterion(model(batch.x), batch.y), {})

    def validation(self, label_names: Sequence[str], crop: int) -> Validation:
        return RestorationValidation()


class RestorationValidation(Validation):
    """PSNR, SSIM and squared error of the restored images, and the input's PSNR, summed
    over images."""

    def __init__(self) -> None:
        self.psnr_sum = 0.0
        self.ssim_sum = 0.0
        self.input_psnr_sum = 0.0
        self.sq_sum = 0.0
        self.values = 0.0
        self.images = 0.0

    def add(self, model: nn.Module, batch: Batch) -> None:
        restored = model(batch.x).clamp(0.0, 1.0)  # (b, C, H, W): images live in [0, 1]
        clean = batch.y
        self.psnr_sum += float(psnr(restored, clean).clamp(max=PSNR_CAP).sum())
        self.ssim_sum += float(image_ssim(restored, clean).sum())
        self.sq_sum += float((restored - clean).double().square().sum())
        self.values += clean.numel()
        given = batch.x
        if given.shape != clean.shape:  # a half-size input: what bilinear upscaling scores
            given = F.interpolate(given, size=clean.shape[-2:], mode="bilinear",
                                  align_corners=False)
        self.input_psnr_sum += float(psnr(given.clamp(0.0, 1.0), clean)
                                     .clamp(max=PSNR_CAP).sum())
        self.images += clean.shape[0]

    def sums(self) -> list[float]:
        return [self.psnr_sum, self.ssim_sum, self.sq_sum, self.values, self.input_psnr_sum,
                self.images]

    def result(self, sums: list[float]) -> dict[str, float]:
        psnr_sum, ssim_sum, sq_sum, values, input_sum, images = sums
        images = max(images, 1)
        return {"val_psnr": psnr_sum / images, "val_ssim": ssim_sum / images,
                "val_mse": sq_sum / max(values, 1), "val_psnr_input": input_sum / images}
