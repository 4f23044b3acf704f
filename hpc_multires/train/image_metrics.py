"""Image quality of a restoration: PSNR and SSIM per image of a batch.

Both take images whose values span `data_range` (1 for images in [0, 1]) and return one value
per image, so a validation pass can average them over samples (and over ranks) like any other
per-sample metric.

SSIM is Wang et al.'s (IEEE TIP 2004): local means, variances and covariance under an 11x11
Gaussian window of standard deviation 1.5, constants C1 = (0.01 L)^2 and C2 = (0.03 L)^2,
averaged over the positions where the window lies inside the image and over channels. That
is scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=L)`, whose value is the mean over the same interior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"image metrics take two batches of the same shape (B, C, H, W), got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: (B, C, H, W) twice -> (B,).
    10 log10(data_range^2 / MSE); +inf for identical images."""
    _check(pred, target)
    diff = (pred.float() - target.float()).flatten(1)  # (B, C*H*W)
    mse = diff.square().mean(dim=1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1D Gaussian taps, float64 (size,)."""
    i = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-0.5 * (i / sigma) ** 2)
    return taps / taps.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
         window_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per image: (B, C, H, W) twice -> (B,), 1 for identical images."""
    _check(pred, target)
    _, c, h, w = pred.shape
    if min(h, w) < window_size:
        raise ValueError(f"SSIM with a {window_size}-pixel window needs images at least that "
                         f"wide, got {h}x{w}; use a smaller window_size")
    # float64: the variances are differences of nearly equal means of squares.
    x, y = pred.double(), target.double()
    taps = gaussian_window(window_size, sigma).to(x.device)
    rows = taps.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    cols = taps.view(1, 1, 1, -1).expand(c, 1, 1, -1)

    def local_mean(v: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, H - k + 1, W - k + 1): the window inside the image only
        return F.conv2d(F.conv2d(v, rows, groups=c), cols, groups=c)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x.square()
    var_y = local_mean(y * y) - mu_y.square()
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
             / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)))
    return index.flatten(1).mean(dim=1).to(pred.dtype if pred.is_floating_point()
                                           else torch.float32)
