"""The task component's settings: what a run learns from its samples.

`regression` (the default) fits the store's labels from its samples; `classify` predicts
the class of each sample of a classification store (`data synth classes`, or `data
convert` of a folder with one sub-folder per class), whose one label is the class index.
The image tasks
(`denoise`, `noise`, `deblur`, `inpaint`, `sr`) restore images: the reader takes the clean
images as stored (values in [0, 1], not normalised), corrupts each one at read time as
`data/corrupt.py` describes (its draws follow from a seed and the sample's index alone, so a
sample is corrupted alike at every pyramid level), and the model learns to map the
corrupted image back to the clean one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hpc_multires.data.corrupt import Corruption
from hpc_multires.errors import ConfigError, require

RESTORATION_KINDS = ("denoise", "noise", "deblur", "inpaint", "sr")


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """What the model learns: labels, or a clean image from a corrupted one."""

    kind: Literal["regression", "classify", "denoise", "noise", "deblur", "inpaint",
                  "sr"] = "regression"
    """regression: the labels, by MSE (validated by MAE). classify: the class of each
    sample, from a store of class indices (its schema names the classes), by cross-entropy
    of the model's class logits (validated by accuracy, `val_acc`, the headline; a model
    that outputs logits: model.name = "convnet2d"). denoise: x_t = t x + (1 - t) z,
    z ~ N(0, 1); noise: x + sigma z; deblur: Gaussian blur plus noise; inpaint: boxes set to
    `fill` plus noise; sr: super-resolution by 2 plus noise. The image tasks need images
    (N, C, H, W) in [0, 1] (`data synth images`, or `data convert` of an image folder) and
    an image-to-image model (model.name = "unet", "resnet2d" or, for sr with sr_input =
    "half", "espcn"); they are validated by PSNR (the headline), SSIM and MSE."""
    sigma: float = -1.0
    """Standard deviation of the added noise at level 0, for images in [0, 1]; negative: the
    task's default (noise 0.1, deblur and inpaint 0.01, sr 0). Not used by denoise."""
    t_range: tuple[float, ...] = (0.0, 1.0)
    """denoise: t is drawn uniformly in [low, high] per sample (t = 1 is the clean image)."""
    blur_sigma: float = 3.0
    """deblur: the blur's standard deviation in level-0 pixels."""
    boxes: tuple[int, ...] = (1, 4)
    """inpaint: the number of boxes per image is drawn in [low, high]."""
    box_fraction: tuple[float, ...] = (0.1, 0.3)
    """inpaint: a box side, drawn in [low, high] as a fraction of the image side."""
    box_align: int = 8
    """inpaint: box corners lie on a grid of this many level-0 pixels (a power of 2), which
    keeps the corruption exact on pyramid levels up to log2(box_align)."""
    fill: float = 0.0
    """inpaint: the value of the missing pixels."""
    sr_input: Literal["prolonged", "half"] = "prolonged"
    """sr: the input at the image's size (averaged by 2, then brought back), or at half its
    size (for model.name = "espcn")."""
    sr_prolong: Literal["bilinear", "nearest"] = "bilinear"
    """sr with sr_input "prolonged": how the half-size image is brought back."""
    coarse_corruption: Literal["restricted", "level"] = "restricted"
    """Image tasks, on pyramid levels L > 0: "restricted", the restriction of the level-0
    corruption (noise of 2^-L times level 0's standard deviation, the blur 2^L times
    narrower in level-L pixels: a milder problem on coarser levels), which the multiscale
    gradient estimator needs (train.estimator = "mge" refuses "level"); "level", the
    level-0 strength in each level's own pixels (noise of level 0's standard deviation, a
    blur of blur_sigma pixels), so every level is the same problem at a lower resolution,
    what a model trained on a coarse level and moved to a finer one needs
    (Full-Multiscale)."""
    ssim_weight: float = 0.0
    """Image tasks: the loss is MSE + ssim_weight * (1 - SSIM) (0: MSE alone)."""
    label_smoothing: float = 0.0
    """classify: the cross-entropy's label smoothing in [0, 1) (0: none): the target puts
    1 - label_smoothing on the class and spreads the rest evenly over all classes."""
    val_seed: int = 0
    """Image tasks: the seed of the validation set's corruptions, fixed for the whole run
    and independent of run.seed, so runs of different seeds are validated on the same
    corrupted images. Training corruptions are drawn anew each epoch from (run.seed,
    epoch)."""

    @property
    def restoration(self) -> bool:
        return self.kind in RESTORATION_KINDS

    @property
    def classify(self) -> bool:
        return self.kind == "classify"

    def corruption(self) -> Corruption:
        """The corruption of an image task (`data/corrupt.py`)."""
        if not self.restoration:
            raise ValueError(f"task.kind = {self.kind!r} has no corruption")
        try:
            return Corruption(
                task=self.kind,  # type: ignore[arg-type]
                sigma=None if self.sigma < 0 else self.sigma,
                t_range=(self.t_range[0], self.t_range[1]), blur_sigma=self.blur_sigma,
                boxes=(self.boxes[0], self.boxes[1]),
                box_fraction=(self.box_fraction[0], self.box_fraction[1]),
                box_align=self.box_align, fill=self.fill, sr_input=self.sr_input,
                sr_prolong=self.sr_prolong,
                coarse=self.coarse_corruption)
        except ValueError as e:  # its message names the field as "corruption FIELD"
            message = str(e).replace("corruption coarse", "corruption coarse_corruption", 1)
            raise ConfigError(message.replace("corruption ", "task.", 1)) from None

    def check(self) -> None:
        """Raise ConfigError naming the key and the fix for a value that cannot work."""
        for key, value in (("t_range", self.t_range), ("boxes", self.boxes),
                           ("box_fraction", self.box_fraction)):
            require(len(value) == 2, f"task.{key}", list(value), "give [low, high]")
        require(self.ssim_weight >= 0, "task.ssim_weight", self.ssim_weight,
                "use 0 (MSE alone) or a positive weight of 1 - SSIM")
        require(self.val_seed >= 0, "task.val_seed", self.val_seed, "use 0 or more")
        require(0.0 <= self.label_smoothing < 1.0, "task.label_smoothing",
                self.label_smoothing, "use a value in [0, 1), e.g. 0 (none) or 0.1")
        require(self.label_smoothing == 0.0 or self.classify, "task.label_smoothing",
                self.label_smoothing,
                f"it smooths a classification's targets: set task.kind = \"classify\" or "
                f"leave it 0 (task.kind = {self.kind!r})")
        if self.restoration:
            self.corruption()
