"""Tests for the synthetic CosmoFlow-like generator (hpc_multires.data.synth.cosmoflow).

The physics tests check that each parameter leaves the summary-statistic fingerprint it is
designed to leave, on a fixed batch of small samples, so they are deterministic. Thresholds sit
well below the values observed when they were set (noted next to each assertion).
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from itertools import pairwise

import numpy as np
import pytest

from hpc_multires.data.synth import cosmoflow as cf

PHYS_SEED = 2024
PHYS_SIZE = 32
PHYS_COUNT = 48


def _rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (no ties expected with continuous data)."""
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra**2).sum() * (rb**2).sum()))


def _power(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|k| in cycles/voxel of ``field``'s own grid and |FFT|^2, both flat over the rfft half-grid.

    Keeping only the rfft half counts the kz=0 plane slightly differently from the rest, which
    does not matter for band averages compared across samples.
    """
    s = field.shape[0]
    p = np.abs(np.fft.rfftn(field - field.mean())) ** 2  # (S, S, S//2+1)
    kx = np.fft.fftfreq(s)
    kz = np.fft.rfftfreq(s)
    k = np.sqrt(kx[:, None, None] ** 2 + kx[None, :, None] ** 2 + kz[None, None, :] ** 2)
    return k.ravel(), p.ravel()


def _band(k: np.ndarray, p: np.ndarray, lo: float, hi: float) -> float:
    m = (k >= lo) & (k < hi)
    assert m.any(), f"no modes in band [{lo}, {hi})"
    return float(p[m].mean())


def _slope_fit(k: np.ndarray, p: np.ndarray, lo: float, hi: float) -> float:
    """Log-log slope of the band-averaged spectrum over five log-spaced bins in [lo, hi)."""
    edges = np.geomspace(lo, hi, 6)
    logk = [np.log(k[(k >= a) & (k < b)].mean()) for a, b in pairwise(edges)]
    logp = [np.log(_band(k, p, a, b)) for a, b in pairwise(edges)]
    return float(np.polyfit(logk, logp, 1)[0])


def _pool2(x: np.ndarray) -> np.ndarray:
    """2x2x2 average pooling of an (S, S, S) array to (S/2, S/2, S/2)."""
    h = x.shape[0] // 2
    return x.reshape(h, 2, h, 2, h, 2).mean(axis=(1, 3, 5))


def _fine_ratio(field: np.ndarray) -> float:
    """Log power in |k| in [0.5, 0.8) over [0.35, 0.45), in the field's own cycles/voxel.

    The upper band lies beyond the axis Nyquist frequency, in the corners of the Fourier cube,
    where the cutoff acts. A nearby reference band keeps the slope's leverage on the ratio small.
    """
    k, p = _power(field)
    return float(np.log(_band(k, p, 0.5, 0.8) / _band(k, p, 0.35, 0.45)))


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    """Summary statistics of a fixed batch of 32^3 samples, computed once for the physics tests."""
    labels, var_last, var_chan, slopes, low_ratio, fine_full, fine_pooled = ([] for _ in range(7))
    for i in range(PHYS_COUNT):
        counts, lab = cf.generate(i, PHYS_SEED, PHYS_SIZE)
        logc = np.log1p(counts.astype(np.float64))  # (C, S, S, S)
        f = logc[-1]  # (S, S, S) fully grown channel
        k, p = _power(f)
        labels.append(lab)
        var_last.append(f.var())
        var_chan.append(logc.reshape(logc.shape[0], -1).var(axis=1))
        slopes.append(_slope_fit(k, p, 0.08, 0.3))
        low_ratio.append(np.log(_band(k, p, 0.03, 0.07) / _band(k, p, 0.1, 0.2)))
        fine_full.append(_fine_ratio(f))
        fine_pooled.append(_fine_ratio(_pool2(f)))
    return {
        "labels": np.array(labels),  # (N, 4)
        "var_last": np.array(var_last),  # (N,)
        "var_chan": np.array(var_chan),  # (N, C)
        "slope_fit": np.array(slopes),
        "low_ratio": np.array(low_ratio),
        "fine_full": np.array(fine_full),
        "fine_pooled": np.array(fine_pooled),
    }


def _label(batch: dict[str, np.ndarray], name: str) -> np.ndarray:
    return batch["labels"][:, cf.LABEL_NAMES.index(name)]


# --- API, determinism, shapes -------------------------------------------------------------


def test_constants_and_param_specs() -> None:
    assert cf.GENERATOR_NAME == "cosmoflow-synth-v1"
    assert cf.LABEL_NAMES == ("amplitude", "slope", "turnover", "cutoff")
    assert tuple(p.name for p in cf.PARAMS) == cf.LABEL_NAMES
    assert [p.log for p in cf.PARAMS] == [False, False, True, True]
    for p in cf.PARAMS:
        assert p.low < p.high
    with pytest.raises(FrozenInstanceError):
        cf.PARAMS[0].low = 0.0  # type: ignore[misc]


def test_generate_is_deterministic_in_seed_and_index() -> None:
    c1, l1 = cf.generate(3, 11, 16)
    c2, l2 = cf.generate(3, 11, 16)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(l1, l2)
    c3, l3 = cf.generate(4, 11, 16)
    c4, l4 = cf.generate(3, 12, 16)
    assert not np.array_equal(c1, c3) and not np.array_equal(l1, l3)
    assert not np.array_equal(c1, c4) and not np.array_equal(l1, l4)


def test_generate_does_not_depend_on_global_state() -> None:
    c1, _ = cf.generate(0, 5, 16)
    np.random.seed(123)
    _ = np.random.standard_normal(10)
    cf.generate(1, 5, 16)  # other samples generated in between must not matter either
    c2, _ = cf.generate(0, 5, 16)
    np.testing.assert_array_equal(c1, c2)


@pytest.mark.parametrize(("size", "channels"), [(16, 4), (8, 1), (32, 3)])
def test_generate_shapes_and_dtypes(size: int, channels: int) -> None:
    counts, labels = cf.generate(7, 1, size, channels=channels)
    assert counts.shape == (channels, size, size, size)
    assert counts.dtype == np.uint16
    assert labels.shape == (4,)
    assert labels.dtype == np.float32
    assert np.all(labels >= -1.0) and np.all(labels <= 1.0)


def test_counts_mean_near_mean_count() -> None:
    counts, _ = cf.generate(0, 3, 32)
    # The lognormal keeps <rho> = 1, so every channel averages ~MEAN_COUNT (observed within 0.3%).
    means = counts.reshape(counts.shape[0], -1).mean(axis=1)
    np.testing.assert_allclose(means, cf.MEAN_COUNT, rtol=0.05)
    # Poisson counts spread over many integers, not a constant or a rounded-off density.
    assert len(np.unique(counts[-1])) > 20


def test_generate_sample_respects_growth_and_mean_count() -> None:
    rng = np.random.default_rng(0)
    params = np.array([0.7, -2.0, 0.06, 0.6])
    out = cf.generate_sample(params, 16, growth=(0.5, 1.0), mean_count=10.0, rng=rng)
    assert out.shape == (2, 16, 16, 16)
    assert out.dtype == np.uint16
    assert abs(out.mean() - 10.0) < 0.5
    # Same rng state, same output: the sample depends only on params and the generator.
    again = cf.generate_sample(
        params, 16, growth=(0.5, 1.0), mean_count=10.0, rng=np.random.default_rng(0)
    )
    np.testing.assert_array_equal(out, again)


def test_counts_clip_to_uint16() -> None:
    params = np.array([1.0, -1.5, 0.12, 0.9])
    out = cf.generate_sample(
        params, 8, growth=(1.0,), mean_count=60000.0, rng=np.random.default_rng(1)
    )
    # Without clipping the densest voxels (> 65535 expected counts) would wrap around to small
    # values; with it they saturate.
    assert out.max() == np.iinfo(np.uint16).max


def test_gaussian_field_has_exact_amplitude() -> None:
    params = np.array([0.55, -2.5, 0.05, 0.6])
    delta = cf.gaussian_field(params, 16, rng=np.random.default_rng(2))
    assert delta.shape == (16, 16, 16)
    assert delta.dtype == np.float32
    assert abs(float(delta.mean())) < 1e-5
    assert abs(float(delta.std()) - 0.55) < 1e-4


def test_growth_factors() -> None:
    assert cf.growth_factors(4) == (0.25, 0.5, 0.75, 1.0)
    assert cf.growth_factors(1) == (1.0,)
    g = cf.growth_factors(5)
    assert g[-1] == 1.0 and all(0 < a < b for a, b in pairwise(g))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 6}, "size"),
        ({"size": 0}, "size"),
        ({"size": 33}, "size"),
        ({"size": 16, "channels": 0}, "channels"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cf.generate(0, 0, **kwargs)


def test_generate_sample_rejects_bad_params() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="params"):
        cf.generate_sample(np.zeros(3), 16, rng=rng)
    with pytest.raises(ValueError, match="growth"):
        cf.generate_sample(np.array([0.5, -2.0, 0.05, 0.6]), 16, growth=(), rng=rng)


# --- parameters and labels ----------------------------------------------------------------


def test_sample_params_within_prior() -> None:
    rng = np.random.default_rng(0)
    draws = np.array([cf.sample_params(rng) for _ in range(2000)])  # (N, 4)
    assert draws.dtype == np.float64 and draws.shape == (2000, 4)
    for j, spec in enumerate(cf.PARAMS):
        assert draws[:, j].min() >= spec.low and draws[:, j].max() <= spec.high
        # Log-uniform priors put the median at the geometric mean, uniform ones at the midpoint.
        centre = np.sqrt(spec.low * spec.high) if spec.log else 0.5 * (spec.low + spec.high)
        assert abs(np.median(draws[:, j]) - centre) < 0.05 * (spec.high - spec.low)


def test_labels_in_range_and_round_trip() -> None:
    rng = np.random.default_rng(1)
    params = np.array([cf.sample_params(rng) for _ in range(200)])  # (N, 4)
    labels = cf.scale_labels(params)
    assert labels.dtype == np.float32 and labels.shape == (200, 4)
    assert labels.min() >= -1.0 and labels.max() <= 1.0
    np.testing.assert_allclose(cf.unscale_labels(labels), params, rtol=1e-5)
    # Prior bounds map exactly onto -1 and +1; a single vector works too.
    low = np.array([p.low for p in cf.PARAMS])
    high = np.array([p.high for p in cf.PARAMS])
    np.testing.assert_allclose(cf.scale_labels(low), -1.0, atol=1e-6)
    np.testing.assert_allclose(cf.scale_labels(high), 1.0, atol=1e-6)
    # Log parameters are scaled in log space: the geometric mean of the range maps to 0.
    mid = np.array(
        [np.sqrt(p.low * p.high) if p.log else 0.5 * (p.low + p.high) for p in cf.PARAMS]
    )
    np.testing.assert_allclose(cf.scale_labels(mid), 0.0, atol=1e-6)


def test_label_maps_reject_wrong_width() -> None:
    with pytest.raises(ValueError):
        cf.scale_labels(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        cf.unscale_labels(np.zeros(5))


# --- physics ------------------------------------------------------------------------------


def test_amplitude_sets_log_count_variance(batch: dict[str, np.ndarray]) -> None:
    r = _rank_corr(_label(batch, "amplitude"), batch["var_last"])
    # Observed 1.00 (the field std equals the amplitude exactly).
    assert r > 0.9, r


def test_slope_sets_measured_spectral_slope(batch: dict[str, np.ndarray]) -> None:
    r = _rank_corr(_label(batch, "slope"), batch["slope_fit"])
    # Observed 0.69 on this batch (0.63 to 0.85 over six other seeds); turnover and cutoff blur it.
    assert r > 0.45, r


def test_turnover_moves_large_scale_power(batch: dict[str, np.ndarray]) -> None:
    r = _rank_corr(_label(batch, "turnover"), batch["low_ratio"])
    # A higher turnover moves power from the largest scales to k ~ 0.1-0.2.
    # Observed -0.55 on this batch (-0.38 to -0.76 over six other seeds).
    assert r < -0.3, r


def test_cutoff_is_a_fine_scale_feature(batch: dict[str, np.ndarray]) -> None:
    cutoff = _label(batch, "cutoff")
    r_full = _rank_corr(cutoff, batch["fine_full"])
    # The same statistic on the 2x pooled field (its own top band, i.e. |k| in [0.25, 0.4) over
    # [0.175, 0.225) in full-resolution units) has lost most of the signal.
    r_pooled = _rank_corr(cutoff, batch["fine_pooled"])
    # Observed r_full 0.73 and r_pooled 0.30 on this batch; over six other seeds r_full was 0.69 to
    # 0.83, r_pooled 0.09 to 0.52 and the gap never below 0.31.
    assert r_full > 0.5, r_full
    assert r_full - r_pooled > 0.2, (r_full, r_pooled)


def test_higher_growth_channels_have_more_variance(batch: dict[str, np.ndarray]) -> None:
    var_chan = batch["var_chan"]  # (N, C)
    assert np.all(np.diff(var_chan.mean(axis=0)) > 0)
    # Observed: monotone for every sample.
    assert np.mean(np.all(np.diff(var_chan, axis=1) > 0, axis=1)) > 0.9


# --- writing a dataset in parallel (data/writer.py) -----------------------------------------


@pytest.mark.parametrize("per_shard", ["0", "-3"])
def test_samples_per_shard_below_one_is_a_user_error(tmp_path, per_shard: str) -> None:
    """0 divided by zero (a traceback); -3 gave "-1 shards", exit 0 and an empty directory."""
    from conftest import run_cli

    out = tmp_path / "d"
    r = run_cli(["data", "synth", "cosmoflow", "--out", str(out), "--samples", "4", "--size",
                 "8", "--samples-per-shard", per_shard], timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "--samples-per-shard" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.mpi
def test_one_ranks_bad_sample_aborts_the_job_at_once(tmp_path) -> None:
    """A bad sample only its writer sees must not wait the grace period meant for errors
    every rank raises (rank 0 is waiting in a barrier and will never print it)."""
    from conftest import run_cli

    x = np.zeros((8, 1, 4), np.float32)
    x[5, 0, 0] = np.nan  # shard 1 of 2: written by rank 1
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.zeros((8, 1), np.float32))
    out = tmp_path / "d"
    r = run_cli(["data", "convert", "--x", str(tmp_path / "x.npy"), "--y",
                 str(tmp_path / "y.npy"), "--out", str(out), "--samples-per-shard", "4"],
                ranks=2, timeout=40, HPC_MULTIRES_ABORT_GRACE_S="120")
    assert r.returncode != 0
    assert "[rank 1/2]" in r.stderr and "sample 5" in r.stderr
    assert not (out / "shard-00001.h5").exists()
