"""Synthetic CosmoFlow-like samples: 3D count fields whose statistics encode four parameters.

Each sample is one periodic Gaussian random field ``delta`` on an ``S^3`` grid, seen at several
growth stages (the channels) through a lognormal transform and Poisson sampling, mimicking the
particle-count histograms of the CosmoFlow benchmark. A CNN has to regress the four parameters
that shaped the field's power spectrum. Wavenumbers ``k`` are in cycles per voxel, so the grid
Nyquist frequency is 0.5 along each axis whatever the size.

The Gaussian field has the power spectrum::

    P(k) = (k / k_t) / (1 + k / k_t) ** (1 - slope) * exp(-(k / k_c) ** 2),    P(0) = 0

and is rescaled so that its standard deviation equals ``amplitude``. The parameters are:

``amplitude`` (0.4 to 1.0, uniform)
    Standard deviation of ``delta`` before the nonlinear transform. Sets the overall contrast:
    the variance of ``log1p(counts)`` grows with it, and the highest channels turn strongly
    non-Gaussian (voids nearly empty, sharp peaks) at the top of the range.
``slope`` (-3.0 to -1.5, uniform)
    Logarithmic slope of ``P(k)`` above the turnover. Steeper (more negative) slopes put the
    variance into smooth large blobs, shallower ones give a grainier field. Visible at any
    resolution that keeps a decade of ``k`` above the turnover.
``turnover`` (0.05 to 0.2 cycles/voxel, log-uniform)
    Turnover wavenumber ``k_t``; below it ``P(k) ~ k``. A large-scale feature: it sets the
    typical size of the largest structures (about ``1 / k_t`` voxels, i.e. 5 to 20 voxels), so
    it survives heavy downsampling but needs a box several times ``1 / k_t`` to be pinned down
    (the range keeps it inside what a 32^3 box samples with more than a few modes).
``cutoff`` (0.45 to 0.9 cycles/voxel, log-uniform)
    Small-scale damping wavenumber ``k_c``, like a warm-dark-matter free-streaming cut. It sets
    the voxel-scale texture: how much power is left at ``|k|`` above about 0.4, which on the
    grid means the axis Nyquist plane (0.5) and the corners of the Fourier cube (up to 0.87).
    2x average pooling keeps only ``|k_i| < 0.25`` per axis (``|k| < 0.43``) and damps the top
    of that, so most of its signal is gone: on 32^3 samples a linear fit on band powers
    recovers it with R^2 ~ 0.85 at full resolution but ~ 0.3 after pooling. The range sits that
    high on purpose, since the Gaussian tail of a lower ``k_c`` would still be visible in the
    pooled band. This is deliberate: multi-resolution training has to trade cheap coarse
    inputs against this parameter.

Each channel ``c`` uses a growth factor ``D_c`` in ``(0, 1]`` on the same ``delta``::

    rho = exp(D * delta - (D * amplitude) ** 2 / 2)      # lognormal, mean 1
    counts ~ Poisson(mean_count * rho), clipped to uint16

Labels are the parameters mapped to ``[-1, 1]`` (in log space for the log-uniform ones) by
:func:`scale_labels`. :func:`generate` is the per-sample entry point: deterministic in
``(seed, index)`` alone, so any rank can produce any sample without coordination.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from hpc_multires.data.synth.priors import ParamSpec, Prior

__all__ = [
    "GENERATOR_NAME",
    "LABEL_NAMES",
    "MEAN_COUNT",
    "PARAMS",
    "ParamSpec",
    "gaussian_field",
    "generate",
    "generate_sample",
    "growth_factors",
    "sample_params",
    "scale_labels",
    "unscale_labels",
]

GENERATOR_NAME = "cosmoflow-synth-v1"

_UINT16_MAX = np.iinfo(np.uint16).max

# Mean particle count per voxel. High enough that shot noise (relative std 1/sqrt(200) ~ 0.07)
# leaves the voxel-scale texture that encodes `cutoff` and `slope` measurable at 32^3.
MEAN_COUNT = 200.0


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("amplitude", 0.4, 1.0, log=False),
    ParamSpec("slope", -3.0, -1.5, log=False),
    ParamSpec("turnover", 0.05, 0.2, log=True),
    ParamSpec("cutoff", 0.45, 0.9, log=True),
)

LABEL_NAMES: tuple[str, ...] = tuple(p.name for p in PARAMS)

PRIOR = Prior(PARAMS)


# The prior's draws and label maps (log space for log-uniform parameters), by name.
sample_params = PRIOR.sample
scale_labels = PRIOR.scale
unscale_labels = PRIOR.unscale


def growth_factors(channels: int) -> tuple[float, ...]:
    """Growth factors used by :func:`generate`: ``channels`` values evenly spaced in (0, 1].

    They are ``(1/C, 2/C, ..., 1)``, e.g. ``(0.25, 0.5, 0.75, 1.0)`` for 4 channels, so the last
    channel is always the fully grown (most nonlinear) field.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    return tuple((c + 1) / channels for c in range(channels))


def _check_size(size: int) -> None:
    # Even sizes keep the rfft Nyquist plane and 2x pooling exact; below 8 there is no spectrum.
    if size < 8 or size % 2:
        raise ValueError(f"size must be an even integer >= 8, got {size}")


@lru_cache(maxsize=8)
def _wavenumbers(size: int) -> np.ndarray:
    """|k| in cycles/voxel on the rfftn half-grid, float32 (S, S, S//2+1), read-only."""
    kx = np.fft.fftfreq(size).astype(np.float32)
    kz = np.fft.rfftfreq(size).astype(np.float32)
    k2 = kx[:, None, None] ** 2 + kx[None, :, None] ** 2 + kz[None, None, :] ** 2
    k = np.sqrt(k2)
    # Shared across calls through the cache, so it must not be mutated by a caller.
    k.setflags(write=False)
    return k


def _power_spectrum(k: np.ndarray, slope: float, turnover: float, cutoff: float) -> np.ndarray:
    """Unnormalised P(k) (same shape as ``k``), with the k=0 mode set to zero."""
    x = k / np.float32(turnover)
    p = x / (1.0 + x) ** np.float32(1.0 - slope) * np.exp(-((k / np.float32(cutoff)) ** 2))
    p[k == 0] = 0.0
    return p


def gaussian_field(params: np.ndarray, size: int, *, rng: np.random.Generator) -> np.ndarray:
    """Periodic Gaussian random field with the spectrum of ``params``, float32 (S, S, S).

    The field has zero mean and standard deviation exactly ``params[0]`` (the amplitude).
    """
    _check_size(size)
    amplitude, slope, turnover, cutoff = (float(v) for v in params)
    # Filtering real white noise gives Hermitian symmetry for free, which irfftn needs.
    noise = rng.standard_normal((size, size, size), dtype=np.float32)  # (S, S, S)
    spec = np.fft.rfftn(noise)  # (S, S, S//2+1)
    spec *= np.sqrt(_power_spectrum(_wavenumbers(size), slope, turnover, cutoff))
    delta = np.fft.irfftn(spec, s=(size, size, size), axes=(0, 1, 2))
    delta = delta.astype(np.float32, copy=False)
    delta -= delta.mean()
    std = float(delta.std())
    # Normalising per sample makes the amplitude exact rather than a noisy ensemble target.
    delta *= np.float32(amplitude / std) if std > 0 else np.float32(0.0)
    return delta


def generate_sample(
    params: np.ndarray,
    size: int,
    growth: tuple[float, ...] = (0.4, 0.6, 0.8, 1.0),
    mean_count: float = MEAN_COUNT,
    *,
    rng: np.random.Generator,
) -> np.ndarray:
    """Generate one sample's counts, uint16 (len(growth), S, S, S), from physical ``params``.

    All channels share one Gaussian field; channel ``c`` is its lognormal transform at growth
    factor ``growth[c]`` followed by Poisson sampling with mean ``mean_count * rho``.
    """
    p = np.asarray(params, dtype=np.float64)
    if p.shape != (len(PARAMS),):
        raise ValueError(f"expected params of shape ({len(PARAMS)},), got {p.shape}")
    _check_size(size)
    if len(growth) < 1:
        raise ValueError("growth must hold at least one growth factor")
    if mean_count <= 0:
        raise ValueError(f"mean_count must be > 0, got {mean_count}")
    amplitude = float(p[0])
    delta = gaussian_field(p, size, rng=rng)  # (S, S, S)
    out = np.empty((len(growth), size, size, size), dtype=np.uint16)  # (C, S, S, S)
    for c, d in enumerate(growth):
        # Subtracting the lognormal variance keeps <rho> = 1, so every channel has the same
        # mean count and only the clustering changes with growth.
        shift = np.log(mean_count) - 0.5 * (d * amplitude) ** 2
        log_lam = np.float32(d) * delta + np.float32(shift)  # (S, S, S)
        # Poisson sampling dominates the cost and is ~25% faster on float64 means.
        counts = rng.poisson(np.exp(log_lam, dtype=np.float64))
        np.minimum(counts, _UINT16_MAX, out=counts)
        out[c] = counts
    return out


def generate(index: int, seed: int, size: int, channels: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Generate sample ``index`` of the dataset with ``seed``: (counts, labels).

    Deterministic in ``(seed, index)`` only, so any rank can produce any sample. The channels use
    the growth factors of :func:`growth_factors` (``(0.25, 0.5, 0.75, 1.0)`` for 4 channels).

    Returns counts uint16 (C, S, S, S) and labels float32 (4,) in [-1, 1].
    """
    _check_size(size)
    growth = growth_factors(channels)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    params = sample_params(rng)
    counts = generate_sample(params, size, growth, rng=rng)
    return counts, scale_labels(params)
