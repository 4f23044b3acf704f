"""Tests for PSNR and SSIM (hpc_multires.train.image_metrics) against known values and a
window-by-window numpy reimplementation of Wang et al.'s SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpc_multires.train.image_metrics import psnr, ssim


def test_psnr_of_a_constant_offset_of_a_tenth_is_20_db() -> None:
    x = torch.rand(3, 2, 8, 8) * 0.8
    torch.testing.assert_close(psnr(x + 0.1, x).double(), torch.full((3,), 20.0,
                                                                     dtype=torch.float64),
                               atol=1e-4, rtol=0)
    # on a 0..255 scale an offset of 25.5 is the same 20 dB
    torch.testing.assert_close(psnr(255 * x + 25.5, 255 * x, data_range=255.0),
                               torch.full((3,), 20.0), atol=1e-4, rtol=0)


def test_psnr_is_per_image_and_infinite_for_identical_images() -> None:
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone()
    y[1] += 0.01  # MSE 1e-4: 40 dB
    out = psnr(y, x)
    assert math.isinf(out[0].item()) and out[0] > 0
    assert abs(out[1].item() - 40.0) < 1e-3


def _ssim_reference(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5,
                    data_range: float = 1.0) -> float:
    """Wang et al.'s SSIM of two (H, W) images, one window position at a time."""
    i = np.arange(size) - (size - 1) / 2
    g = np.exp(-0.5 * (i / sigma) ** 2)
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for r in range(x.shape[0] - size + 1):
        for c in range(x.shape[1] - size + 1):
            px, py = x[r:r + size, c:c + size], y[r:r + size, c:c + size]
            mx, my = (win * px).sum(), (win * py).sum()
            vx, vy = (win * (px - mx) ** 2).sum(), (win * (py - my) ** 2).sum()
            cov = (win * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cov + c2)
                          / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_a_window_by_window_reference() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 16, 14))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    y[1] = 0.5 * x[1] + 0.2  # a contrast and brightness change
    got = ssim(torch.from_numpy(y), torch.from_numpy(x))
    want = [np.mean([_ssim_reference(y[b, c], x[b, c]) for c in range(3)]) for b in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    assert 0.3 < want[0] < 0.95  # a real middle value, not a degenerate 0 or 1


def test_ssim_of_identical_images_is_one_and_of_constants_is_the_luminance_term() -> None:
    x = torch.rand(2, 1, 12, 12)
    torch.testing.assert_close(ssim(x, x), torch.ones(2), atol=1e-6, rtol=0)
    a, b = 0.3, 0.7  # flat images: no variance, so only the luminance term is left
    c1 = 0.01**2
    got = ssim(torch.full((1, 1, 11, 11), a), torch.full((1, 1, 11, 11), b))
    assert abs(got.item() - (2 * a * b + c1) / (a * a + b * b + c1)) < 1e-6


def test_ssim_falls_with_noise() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 32)
    values = [ssim((x + s * torch.randn_like(x)).clamp(0, 1), x).item() for s in (0.01, 0.1, 0.3)]
    assert values[0] > values[1] > values[2]


def test_metrics_refuse_mismatched_or_small_images() -> None:
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="smaller window_size"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
