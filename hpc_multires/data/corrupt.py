"""Corruptions for image restoration, made at read time: the same sample, the same corruption,
at every pyramid level.

A restoration network learns to map a corrupted image back to the clean one. The clean image
is in the store (`/x`, and its averages on the pyramid levels); the corrupted input is made
here, as a pure function of (clean batch, sample ids, seed, level). Every random choice of a
sample is drawn from ``(seed, sample id)`` alone, at level 0 and in level-0 pixel units, and
carried to level L by averaging over blocks of ``2^L`` pixels, the restriction that made the
level's images. So a sample's corruption does not depend on the batch it is in, on the rank
that reads it, or on the level it is read at. Pass a seed derived from (run seed, epoch) for
fresh corruptions every epoch, and a fixed one for validation.

With ``R`` the average pooling from level 0 to level L, ``x0`` a level-0 image and
``corrupt_L`` the corruption at level L, the construction guarantees:

- ``denoise`` (``x_t = t x + (1 - t) z``, ``z ~ N(0, 1)``, ``t`` uniform in ``t_range`` per
  sample), ``noise`` (``x + sigma z``) and ``inpaint`` (boxes set to ``fill``, plus
  ``sigma z``): ``corrupt_L(R x0) = R corrupt_0(x0)`` exactly (up to float rounding). The
  corruption is linear in (x, z) for fixed draws, ``z`` at level L is ``R z0``, and inpainting
  boxes have corners on a grid of ``box_align`` level-0 pixels, so the mask is constant on
  every pooling block up to level log2(box_align) and ``R (m x) = (R m)(R x)``. The noise at
  level L is therefore ``R z0``, of standard deviation ``2^-L``: the restricted pair, as a
  coarse level of the same problem sees it.
- ``deblur`` (Gaussian blur of standard deviation ``blur_sigma`` level-0 pixels, i.e.
  ``blur_sigma / 2^L`` level-L pixels, plus ``sigma z``): the noise part is exact as above;
  the blur commutes with averaging only approximately (``R B_0 x0`` depends on detail of
  ``x0`` that ``R x0`` has lost). On the synthetic images with ``blur_sigma = 3`` the
  difference is 1% of what the blur changes at level 1 and 7% at level 2
  (``tests/test_corrupt.py`` bounds it); at level 3 the blur is under half a pixel and the
  difference is as large as the blur itself, so the coarse task there is no longer a
  restriction of the fine one.
- ``sr`` (super-resolution by 2): the input is the level's own image averaged by 2 and
  brought back to its size (``sr_input = "prolonged"``, bilinear or nearest), or left at half
  size (``"half"``, for sub-pixel networks), plus ``sigma z``. Restricting the level-0 input
  would instead give back the clean level-L image, which leaves nothing to restore, so
  super-resolution is the same relative task at every level: ``corrupt_L(x) = P R_2 x + noise``
  whatever L.

That is ``coarse = "restricted"`` (the default), what the multiscale gradient estimator needs:
its coarse terms must see the restriction of the fine data. With ``coarse = "level"`` each
level instead gets the level-0 strength in its own pixels: the noise is ``2^L R z0`` (the same
draws, rescaled to standard deviation 1 per level-L pixel), and the deblurring blur is
``blur_sigma`` level-L pixels. A network sees pixels, so every level is then the same
restoration problem at a lower resolution, which is what a model trained on a coarse level
and moved to a finer one (Full-Multiscale) needs. Inpainting boxes (fractions of the image
side) and super-resolution's averaging by 2 are the same relative corruption either way; only
their noise changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Task = Literal["denoise", "noise", "deblur", "inpaint", "sr"]
CoarseCorruption = Literal["restricted", "level"]
COARSE_CORRUPTIONS: tuple[str, ...] = ("restricted", "level")
TASKS: tuple[str, ...] = ("denoise", "noise", "deblur", "inpaint", "sr")
# Default standard deviation of the added noise per task, at level 0, for images in [0, 1].
DEFAULT_SIGMA = {"denoise": 0.0, "noise": 0.1, "deblur": 0.01, "inpaint": 0.01, "sr": 0.0}

__all__ = ["COARSE_CORRUPTIONS", "TASKS", "Corruption", "average_pool", "corrupt",
           "gaussian_blur", "prolong2"]


@dataclass(frozen=True, kw_only=True)
class Corruption:
    """What a restoration task does to a clean image; values in level-0 pixel units."""

    task: Task
    """denoise: x_t = t x + (1 - t) z; noise: x + sigma z; deblur: Gaussian blur plus noise;
    inpaint: boxes set to `fill`, plus noise; sr: super-resolution by 2, plus noise."""
    sigma: float | None = None
    """Standard deviation of the added noise at level 0; None: the task's DEFAULT_SIGMA.
    Not used by denoise, whose noise weight is 1 - t."""
    t_range: tuple[float, float] = (0.0, 1.0)
    """denoise: t is drawn uniformly in this range per sample (t = 1 is the clean image)."""
    blur_sigma: float = 3.0
    """deblur: standard deviation of the Gaussian blur in level-0 pixels."""
    boxes: tuple[int, int] = (1, 4)
    """inpaint: the number of boxes is drawn uniformly in this range, both ends included."""
    box_fraction: tuple[float, float] = (0.1, 0.3)
    """inpaint: a box side is drawn uniformly in this range, as a fraction of the image side."""
    box_align: int = 8
    """inpaint: box corners lie on a grid of this many level-0 pixels, which keeps the
    corruption exact on levels up to log2(box_align)."""
    fill: float = 0.0
    """inpaint: the value of the missing pixels."""
    sr_input: Literal["prolonged", "half"] = "prolonged"
    """sr: input at the image's size (averaged by 2, then prolonged), or at half its size."""
    sr_prolong: Literal["bilinear", "nearest"] = "bilinear"
    """sr with sr_input "prolonged": how the half-size image is brought back."""
    coarse: CoarseCorruption = "restricted"
    """On pyramid level L > 0: "restricted", the restriction of the level-0 corruption (noise
    of standard deviation 2^-L times level 0's, blur of blur_sigma / 2^L level-L pixels);
    "level", the level-0 strength in level-L pixels (the same draws, noise rescaled by 2^L,
    blur of blur_sigma level-L pixels)."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"corruption task {self.task!r}: use one of {TASKS}")
        if self.sigma is not None and not self.sigma >= 0:
            raise ValueError(f"corruption sigma = {self.sigma}: use a value >= 0")
        lo, hi = self.t_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"corruption t_range = {self.t_range}: use 0 <= low <= high <= 1")
        if not self.blur_sigma > 0:
            raise ValueError(f"corruption blur_sigma = {self.blur_sigma}: use a value > 0")
        if not 0 <= self.boxes[0] <= self.boxes[1]:
            raise ValueError(f"corruption boxes = {self.boxes}: use 0 <= low <= high")
        if not 0.0 < self.box_fraction[0] <= self.box_fraction[1] <= 1.0:
            raise ValueError(f"corruption box_fraction = {self.box_fraction}: use "
                             "0 < low <= high <= 1")
        if self.box_align < 1 or self.box_align & (self.box_align - 1):
            raise ValueError(f"corruption box_align = {self.box_align}: use a power of 2 "
                             "(8 keeps inpainting exact down to pyramid level 3)")
        if self.sr_input not in ("prolonged", "half"):
            raise ValueError(f"corruption sr_input = {self.sr_input!r}: use 'prolonged' or "
                             "'half'")
        if self.coarse not in COARSE_CORRUPTIONS:
            raise ValueError(f"corruption coarse = {self.coarse!r}: use 'restricted' or "
                             "'level'")
        if self.sr_prolong not in ("bilinear", "nearest"):
            raise ValueError(f"corruption sr_prolong = {self.sr_prolong!r}: use 'bilinear' or "
                             "'nearest'")

    @property
    def noise_sigma(self) -> float:
        return DEFAULT_SIGMA[self.task] if self.sigma is None else float(self.sigma)


def average_pool(x: np.ndarray, factor: int) -> np.ndarray:
    """Mean over blocks of factor x factor on the last two axes: (..., H, W) -> (..., H/f, W/f),
    float32 (summed in float64)."""
    if factor == 1:
        return x.astype(np.float32, copy=False)
    *lead, h, w = x.shape
    if h % factor or w % factor:
        raise ValueError(f"image of {h}x{w} pixels cannot be averaged over blocks of {factor}")
    blocks = x.reshape(*lead, h // factor, factor, w // factor, factor)
    return blocks.mean(axis=(-3, -1), dtype=np.float64).astype(np.float32)


def prolong2(x: np.ndarray, mode: Literal["bilinear", "nearest"] = "bilinear") -> np.ndarray:
    """Twice the size on the last two axes: (..., H, W) -> (..., 2H, 2W), float32.

    bilinear: pixel centres aligned (as torch's align_corners=False), edges clamped; along
    each axis a fine pixel is 3/4 of its coarse pixel and 1/4 of the nearer neighbour.
    """
    out = x.astype(np.float32)
    for axis in (out.ndim - 2, out.ndim - 1):
        n = out.shape[axis]
        if mode == "nearest":
            out = np.repeat(out, 2, axis=axis)
            continue
        idx = np.arange(n)
        before = np.take(out, np.maximum(idx - 1, 0), axis=axis)
        after = np.take(out, np.minimum(idx + 1, n - 1), axis=axis)
        pair = np.stack([0.75 * out + 0.25 * before, 0.75 * out + 0.25 * after], axis=axis + 1)
        shape = list(out.shape)
        shape[axis] = 2 * n
        out = pair.reshape(shape)  # fine pixels 2i, 2i + 1 from coarse pixel i
    return out


def _gaussian_taps(sigma: float) -> np.ndarray:
    """Normalised Gaussian taps of standard deviation `sigma` pixels, radius ceil(3 sigma)."""
    radius = max(1, int(np.ceil(3.0 * sigma)))
    i = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (i / sigma) ** 2)
    return taps / taps.sum()


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the last two axes, mirrored at the borders: float32, the
    shape of `x`."""
    taps = _gaussian_taps(sigma)
    radius = len(taps) // 2
    out = x.astype(np.float64)
    for axis in (-2, -1):
        n = out.shape[axis]
        if radius >= n:
            raise ValueError(f"blur of sigma {sigma:.3g} pixels needs images wider than "
                             f"{radius} pixels, got {n}")
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        acc = np.zeros_like(out)
        for j, tap in enumerate(taps):
            acc += tap * np.take(padded, np.arange(j, j + n), axis=axis)
        out = acc
    return out.astype(np.float32)


def _draw_boxes(rng: np.random.Generator, spec: Corruption, size0: tuple[int, int]
                ) -> np.ndarray:
    """Missing-pixel mask at level 0, float32 (H0, W0): 1 where kept, 0 in a box."""
    h0, w0 = size0
    a = spec.box_align
    keep = np.ones((h0, w0), np.float32)
    count = int(rng.integers(spec.boxes[0], spec.boxes[1] + 1))
    for _ in range(count):
        frac = rng.uniform(*spec.box_fraction, size=2)  # (height, width) fractions
        bh = max(1, round(frac[0] * h0 / a)) * a  # whole cells of the alignment grid
        bw = max(1, round(frac[1] * w0 / a)) * a
        top = int(rng.integers(0, (h0 - bh) // a + 1)) * a
        left = int(rng.integers(0, (w0 - bw) // a + 1)) * a
        keep[top:top + bh, left:left + bw] = 0.0
    return keep


def corrupt(clean: np.ndarray, sample_ids: Sequence[int] | np.ndarray, *, seed: int,
            level: int, spec: Corruption) -> np.ndarray:
    """The restoration input for each clean image of a batch at pyramid `level`.

    clean: (B, C, H, W) float, at level `level` (level-0 size (H 2^level, W 2^level)), values
    in [0, 1]; sample_ids: (B,) dataset indices. Returns float32 (B, C, H, W), or
    (B, C, H/2, W/2) for sr with sr_input "half". Row b depends on (clean[b], sample_ids[b],
    seed, level, spec) alone.
    """
    if clean.ndim != 4:
        raise ValueError(f"corrupt takes a batch of images (B, C, H, W), got shape {clean.shape}")
    ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
    if len(ids) != len(clean):
        raise ValueError(f"{len(ids)} sample ids for a batch of {len(clean)} images")
    if level < 0:
        raise ValueError(f"level {level}: pyramid levels are >= 0")
    factor = 2**level
    _, c, h, w = clean.shape
    size0 = (h * factor, w * factor)
    if spec.task == "inpaint":
        if spec.box_align % factor:
            raise ValueError(f"inpainting boxes aligned to {spec.box_align} level-0 pixels are "
                             f"not whole pixels of level {level}; set box_align to a multiple "
                             f"of {factor}")
        if size0[0] % spec.box_align or size0[1] % spec.box_align:
            raise ValueError(f"images of {size0[0]}x{size0[1]} level-0 pixels do not hold a "
                             f"whole number of {spec.box_align}-pixel box cells; use a smaller "
                             "box_align")
    if spec.task == "sr" and (h % 2 or w % 2):
        raise ValueError(f"super-resolution by 2 needs even image sides, got {h}x{w}")
    sigma = spec.noise_sigma
    at_level = spec.coarse == "level"
    # "level": the averaged noise (std 2^-L) rescaled to std 1, the blur in level-L pixels.
    noise_gain = np.float32(factor if at_level else 1.0)
    blur_pixels = spec.blur_sigma if at_level else spec.blur_sigma / factor
    out = []
    for image, sample in zip(clean.astype(np.float32, copy=False), ids, strict=True):
        rng = np.random.default_rng(np.random.SeedSequence([seed, int(sample)]))
        # Scalars and boxes first, the noise field last, so that no draw depends on the size.
        t = rng.uniform(*spec.t_range) if spec.task == "denoise" else 1.0
        keep = _draw_boxes(rng, spec, size0) if spec.task == "inpaint" else None
        needs_noise = spec.task == "denoise" or sigma > 0
        z = (noise_gain * average_pool(rng.standard_normal((c, *size0), dtype=np.float32),
                                       factor)
             if needs_noise else None)  # (C, H, W): level-0 noise averaged to this level
        if spec.task == "denoise":
            assert z is not None
            y = np.float32(t) * image + np.float32(1.0 - t) * z
        else:
            if spec.task == "deblur":
                y = gaussian_blur(image, blur_pixels)
            elif spec.task == "inpaint":
                assert keep is not None
                m = average_pool(keep, factor)  # (H, W), 0 or 1 while box_align allows
                y = m * image + (1.0 - m) * np.float32(spec.fill)
            elif spec.task == "sr":
                half = average_pool(image, 2)
                if spec.sr_input == "half":
                    y = half
                    z = None if z is None else average_pool(z, 2)
                else:
                    y = prolong2(half, spec.sr_prolong)
            else:
                y = image.copy()
            if z is not None:
                y = y + np.float32(sigma) * z
        out.append(y.astype(np.float32, copy=False))
    return np.stack(out)
