"""Synthetic 2D images for restoration tasks: edges, smooth regions, textures, 1/f^2 detail.

A restoration network (denoising, deblurring, inpainting, super-resolution) has something to
learn only when images hold what natural images hold: regions of slowly varying intensity
bounded by sharp edges, oriented textures, and a scale-free background whose power falls as
a power of the spatial frequency. Each sample here is built from exactly those parts, on an
``S x S`` grid with values in [0, 1]:

1. **Regions.** A Voronoi partition of the unit square into ``cells`` cells (straight edges
   meeting at junctions), with 0 to 3 ellipses laid on top (curved edges, occlusion). Each
   region has its own colour and a linear shading gradient, so it is smooth inside and
   discontinuous at its border.
2. **Textures.** Each region is, with probability ``texture_share``, filled with a sine
   grating of random orientation and phase at about ``texture_freq`` cycles per pixel of the
   level-0 grid. Averaging over ``m`` pixels along the grating's direction keeps
   ``|sin(pi f m) / (m sin(pi f))|`` of its amplitude: at f = 0.2 a quarter after pyramid
   level 2 (m = 4), at f = 0.25 nothing. A fine-scale feature that coarse levels lose, as
   a multiscale method has to face.
3. **Background.** A Gaussian random field with power spectrum ``P(k) ~ k^slope`` (``k`` in
   cycles/pixel, ``P(0) = 0``), scaled to standard deviation ``roughness``. ``slope = -2`` is
   the 1/f^2 power law of natural images.

The sum is clipped to [0, 1]. With 3 channels each region has an RGB colour and the texture
and background are shared (luminance) with per-channel gains near 1, so channels are
correlated as in photographs. Region geometry lives in the unit square, textures and the
background on the pixel grid.

The five parameters are drawn per sample and stored as labels in [-1, 1] (log space for the
log-uniform ones), like the other generators' physical parameters; a restoration task ignores
them, a regression task can learn them. :func:`generate` is deterministic in
``(seed, index)`` alone, so any rank can produce any sample.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from hpc_multires.data.synth.priors import ParamSpec, Prior

__all__ = [
    "CHANNELS",
    "GENERATOR_NAME",
    "LABEL_NAMES",
    "PARAMS",
    "check_args",
    "generate",
    "power_law_field",
    "render",
    "sample_params",
    "scale_labels",
    "unscale_labels",
]

GENERATOR_NAME = "images-synth-v1"

CHANNELS = (1, 3)
MIN_SIZE = 16

PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("slope", -3.0, -1.5, log=False),
    ParamSpec("roughness", 0.02, 0.12, log=True),
    ParamSpec("cells", 3.0, 40.0, log=True),
    ParamSpec("texture_freq", 0.04, 0.25, log=True, unit="cycles/pixel"),
    ParamSpec("texture_share", 0.0, 0.6, log=False),
)

LABEL_NAMES: tuple[str, ...] = tuple(p.name for p in PARAMS)

PRIOR = Prior(PARAMS)
sample_params = PRIOR.sample
scale_labels = PRIOR.scale
unscale_labels = PRIOR.unscale


def check_args(size: int, channels: int) -> None:
    """ValueError naming the fix for a size or channel count the generator does not make."""
    # Even sizes keep the rfft Nyquist line and 2x pooling exact.
    if size < MIN_SIZE or size % 2:
        raise ValueError(f"size must be an even integer >= {MIN_SIZE} (e.g. 64, 128, 256), "
                         f"got {size}")
    if channels not in CHANNELS:
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")


@lru_cache(maxsize=8)
def _wavenumbers(size: int) -> np.ndarray:
    """|k| in cycles/pixel on the rfft2 half-grid, float64 (S, S//2+1), read-only."""
    ky = np.fft.fftfreq(size)
    kx = np.fft.rfftfreq(size)
    k = np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    k.setflags(write=False)  # shared through the cache
    return k


def power_law_field(size: int, slope: float, std: float, *,
                    rng: np.random.Generator) -> np.ndarray:
    """Periodic Gaussian random field with P(k) ~ k^slope, zero mean, std exactly `std`:
    float64 (S, S)."""
    k = _wavenumbers(size)
    amplitude = np.zeros_like(k)
    amplitude[k > 0] = k[k > 0] ** (slope / 2.0)
    # Filtering real white noise keeps the Hermitian symmetry irfft2 needs.
    spec = np.fft.rfft2(rng.standard_normal((size, size))) * amplitude  # (S, S//2+1)
    field = np.fft.irfft2(spec, s=(size, size))
    field -= field.mean()
    s = float(field.std())
    return field * (std / s) if s > 0 else field


def _regions(size: int, cells: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """Region index per pixel, int (S, S), and each region's anchor point (R, 2) in the unit
    square: Voronoi cells, then ellipses laid over them (each a region of its own)."""
    u = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1)
    yy, xx = np.meshgrid(u, u, indexing="ij")  # (S, S) each
    sites = rng.uniform(0.0, 1.0, (cells, 2))  # (n, 2) as (y, x)
    d2 = (yy[None] - sites[:, 0, None, None]) ** 2 + (xx[None] - sites[:, 1, None, None]) ** 2
    region = d2.argmin(axis=0)  # (S, S)
    anchors = [sites]
    for e in range(int(rng.integers(0, 4))):
        centre = rng.uniform(0.1, 0.9, 2)
        a, b = rng.uniform(0.05, 0.3, 2)  # semi-axes, unit square
        angle = rng.uniform(0.0, np.pi)
        dy, dx = yy - centre[0], xx - centre[1]
        along = dy * np.sin(angle) + dx * np.cos(angle)
        across = dy * np.cos(angle) - dx * np.sin(angle)
        region[(along / a) ** 2 + (across / b) ** 2 <= 1.0] = cells + e
        anchors.append(centre[None])
    return region, np.concatenate(anchors)


def render(params: np.ndarray, size: int, channels: int, *,
           rng: np.random.Generator) -> np.ndarray:
    """One image from physical `params` (see PARAMS): float32 (C, S, S) in [0, 1]."""
    p = np.asarray(params, dtype=np.float64)
    if p.shape != (len(PARAMS),):
        raise ValueError(f"expected params of shape ({len(PARAMS)},), got {p.shape}")
    check_args(size, channels)
    slope, roughness, cells, texture_freq, texture_share = (float(v) for v in p)
    region, anchors = _regions(size, max(1, round(cells)), rng)  # (S, S), (R, 2)
    num_regions = len(anchors)

    # Smooth shading: colour at the anchor plus a linear gradient (per unit length).
    colour = rng.uniform(0.15, 0.85, (num_regions, channels))  # (R, C)
    gradient = rng.normal(0.0, 0.25, (num_regions, channels, 2))  # (R, C, 2)
    u = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(u, u, indexing="ij")  # (S, S)
    offset = np.stack([yy - anchors[region, 0], xx - anchors[region, 1]])  # (2, S, S)
    image = colour[region].transpose(2, 0, 1) + np.einsum(  # (C, S, S)
        "yxcd,dyx->cyx", gradient[region], offset)

    # Oriented gratings in some regions, in pixel units of this grid.
    gains = rng.uniform(0.8, 1.2, channels) if channels > 1 else np.ones(1)  # (C,)
    luminance = np.zeros((size, size))
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    for r in range(num_regions):
        if rng.uniform() >= texture_share:
            continue
        freq = texture_freq * float(np.exp(rng.normal(0.0, 0.2)))
        angle = rng.uniform(0.0, np.pi)
        amplitude, phase = rng.uniform(0.05, 0.15), rng.uniform(0.0, 2 * np.pi)
        mask = region == r
        wave = np.sin(2 * np.pi * freq * (rows[mask] * np.sin(angle) + cols[mask] * np.cos(angle))
                      + phase)
        luminance[mask] += amplitude * wave

    luminance += power_law_field(size, slope, roughness, rng=rng)
    image += gains[:, None, None] * luminance[None]
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def generate(index: int, seed: int, size: int, channels: int = 1
             ) -> tuple[np.ndarray, np.ndarray]:
    """Sample `index` of the dataset with `seed`: image float32 (C, S, S) in [0, 1] and labels
    float32 (5,) in [-1, 1]. Deterministic in (seed, index) only."""
    check_args(size, channels)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    params = sample_params(rng)
    return render(params, size, channels, rng=rng), scale_labels(params)
