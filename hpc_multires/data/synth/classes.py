"""Synthetic 2D images for classification, with the class evidence spread over the image.

A classifier trained on sub-images (the local CNNs of domain decomposition, a window of a
`crop` stage) has a real problem to face only when no sub-image decides the class: each
part must hold some evidence, and only the whole image all of it. Each sample here is an
``S x S`` image in [0, 1] of class ``c`` (``c = index mod K``, so every contiguous range of
samples, a validation tail included, is balanced), built from two kinds of evidence and
several nuisances:

1. **Texture orientation.** 6 to 10 grating patches (Gaussian-windowed sine waves) at
   uniformly random places over the whole image, each of one of two scales: coarse (a
   window of S/9, about 5 cycles per image side, which survives pyramid level 2) or fine
   (a window of S/16, about 12 cycles per side, which level 1 keeps and level 2 loses).
   A patch has the class's orientation (one of ``T = ceil(K / 2)`` angles ``o * 180 / T``
   degrees, jittered by 6 degrees) with probability 0.6, else a uniformly random one: the
   class orientation is the one most patches share, a vote over the whole image.
2. **Object count.** Bright discs (soft-edged, radius S/32 to S/12, so several scales too)
   at random places, 3 to 6 of them for the class's "few" level and 9 to 13 for "many".
   The whole image separates the two levels; a quarter of it holds Binomial(n, 1/4) of
   them (1.1 against 2.75 on average), which overlap.

Class ``c`` is orientation ``c // 2`` and count level ``c % 2``, named like
``o090-many``; the names sort in class order. With K = 2 there is one orientation and the
count alone decides.

Nuisances, drawn per image independently of the class: 2 to 8 dark discs (objects that do
not count), a 1/f^alpha background (alpha in [1.8, 2.6]), white noise, and a global offset
and contrast; with 3 channels, a per-channel gain (a tint). Values are clipped to [0, 1].

So a quarter of an image gives partial evidence: its patches and discs are a fourth of the
image's, often too few to vote on the orientation or to tell the count level.
`tests/test_classes_synth.py` checks it: the rule that classifies from the true elements
(orientation vote, disc count against a threshold) is right for 0.97 of the whole images
and for at most 0.65 of the quarters, with K = 4 (chance 0.25). :func:`generate` is
deterministic in ``(seed, index)`` alone, so any rank can produce any sample;
:func:`layout` gives the elements an image is drawn from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hpc_multires.data.synth.images import power_law_field

__all__ = [
    "CHANNELS",
    "COUNT_LEVELS",
    "GENERATOR_NAME",
    "LABEL_NAMES",
    "Layout",
    "check_args",
    "class_names",
    "generate",
    "layout",
    "orientations",
    "render",
]

GENERATOR_NAME = "classes-synth-v1"
LABEL_NAMES = ("class",)
CHANNELS = (1, 3)
MIN_SIZE = 32
MAX_CLASSES = 16
COUNT_LEVELS = ((3, 6), (9, 13))
"""Bright discs per image, [low, high], of the "few" and the "many" count level."""
ON_CLASS = 0.6  # a patch's chance of having the class orientation
JITTER_DEG = 6.0
PATCH_SCALES = ((9.0, 5.0), (16.0, 12.0))  # (window: S / this, cycles per image side)


def check_args(size: int, classes: int, channels: int) -> None:
    """ValueError naming the fix for arguments the generator does not take."""
    if size < MIN_SIZE or size % 2:
        raise ValueError(f"size must be an even integer >= {MIN_SIZE} (e.g. 64, 128), "
                         f"got {size}")
    if not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be 2 to {MAX_CLASSES} (K classes: ceil(K/2) "
                         f"orientations x 2 count levels), got {classes}")
    if channels not in CHANNELS:
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")


def orientations(classes: int) -> int:
    """T: the number of class orientations, ceil(K / 2)."""
    return -(-classes // 2)


def class_factors(cls: int, classes: int) -> tuple[float, int]:
    """(orientation in radians, count level 0 or 1) of class `cls`."""
    return (cls // 2) * math.pi / orientations(classes), cls % 2


def class_names(classes: int) -> tuple[str, ...]:
    """One name per class, in class order (which is also their sorted order)."""
    t = orientations(classes)
    return tuple(f"o{round((c // 2) * 180 / t):03d}-{('few', 'many')[c % 2]}"
                 for c in range(classes))


@dataclass(frozen=True)
class Layout:
    """The elements one image is drawn from, in pixel units of its grid."""

    cls: int
    patches: np.ndarray
    """(n, 5): centre y, centre x, angle (radians in [0, pi)), scale (0 coarse, 1 fine),
    whether it has the class orientation (1) or a random one (0)."""
    discs: np.ndarray
    """(n, 3): centre y, centre x, radius of the bright discs (the counted objects)."""
    dark: np.ndarray
    """(n, 3): the same for the dark discs (nuisance)."""


def _place_discs(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`count` discs (y, x, r) inside the image, apart from each other (by rejection, so
    they can be counted; after 50 tries a disc may touch another)."""
    out: list[tuple[float, float, float]] = []
    for _ in range(count):
        r = rng.uniform(size / 32, size / 12)
        for _try in range(50):
            y, x = rng.uniform(r, size - r, 2)
            if all(math.hypot(y - v, x - u) >= r + s + 2 for v, u, s in out):
                break
        out.append((float(y), float(x), float(r)))
    return np.array(out, dtype=np.float64).reshape(-1, 3)


def layout(index: int, seed: int, size: int, classes: int) -> Layout:
    """The elements of sample `index` of the dataset with `seed`."""
    check_args(size, classes, 1)
    return _layout(index, classes, size, _rng(index, seed))


def _rng(index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, 0xC1A5]))


def _layout(index: int, classes: int, size: int, rng: np.random.Generator) -> Layout:
    cls = index % classes
    angle, level = class_factors(cls, classes)
    n = int(rng.integers(6, 11))
    on = rng.uniform(size=n) < ON_CLASS
    angles = np.where(on, angle + np.deg2rad(rng.normal(0.0, JITTER_DEG, n)),
                      rng.uniform(0.0, np.pi, n)) % np.pi
    patches = np.column_stack([rng.uniform(0, size, (n, 2)), angles,
                               rng.integers(0, 2, n), on]).astype(np.float64)
    low, high = COUNT_LEVELS[level]
    discs = _place_discs(int(rng.integers(low, high + 1)), size, rng)
    dark = _place_discs(int(rng.integers(2, 9)), size, rng)
    return Layout(cls, patches, discs, dark)


def render(lay: Layout, size: int, channels: int, *, rng: np.random.Generator) -> np.ndarray:
    """The image of a layout, nuisances drawn from `rng`: float32 (C, S, S) in [0, 1]."""
    rows, cols = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    signal = np.zeros((size, size))  # (S, S)
    for y, x, angle, scale, _on in lay.patches:
        window, cycles = PATCH_SCALES[int(scale)]
        sigma, freq = size / window, cycles / size  # pixels, cycles per pixel
        amplitude, phase = rng.uniform(0.12, 0.22), rng.uniform(0.0, 2 * np.pi)
        dy, dx = rows - y, cols - x
        along = dy * np.sin(angle) + dx * np.cos(angle)  # across the stripes
        envelope = np.exp(-(dy**2 + dx**2) / (2 * sigma**2))
        signal += amplitude * envelope * np.sin(2 * np.pi * freq * along + phase)
    for discs, low, high in ((lay.discs, 0.30, 0.45), (lay.dark, -0.35, -0.20)):
        for y, x, r in discs:
            d = np.hypot(rows - y, cols - x)
            signal += rng.uniform(low, high) / (1.0 + np.exp((d - r) / 0.7))  # soft edge
    signal += power_law_field(size, rng.uniform(-2.6, -1.8), rng.uniform(0.04, 0.08), rng=rng)
    offset, contrast = rng.uniform(0.35, 0.55), rng.uniform(0.75, 1.25)
    gains = rng.uniform(0.8, 1.2, channels) if channels > 1 else np.ones(1)  # (C,)
    image = offset + contrast * gains[:, None, None] * signal[None]  # (C, S, S)
    image += rng.normal(0.0, rng.uniform(0.01, 0.04), image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def generate(index: int, seed: int, size: int, classes: int, channels: int = 1
             ) -> tuple[np.ndarray, np.ndarray]:
    """Sample `index` of the dataset with `seed`: image float32 (C, S, S) in [0, 1] and its
    class index as float32 (1,). Deterministic in (seed, index) only."""
    check_args(size, classes, channels)
    rng = _rng(index, seed)
    lay = _layout(index, classes, size, rng)
    return render(lay, size, channels, rng=rng), np.array([lay.cls], np.float32)
