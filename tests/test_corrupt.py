"""Tests for read-time corruptions (hpc_multires.data.corrupt).

The property the construction guarantees: corrupting a level-0 image and averaging the
result down to level L gives what corrupting the level-L image gives, exactly for noise,
denoising (x_t) and inpainting, approximately (bounded here) for the blur of deblurring.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpc_multires.data.corrupt import (
    Corruption,
    average_pool,
    corrupt,
    gaussian_blur,
    prolong2,
)
from hpc_multires.data.synth import images as im

SEED = 11
IDS = np.array([3, 17, 4, 250])


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    """Four level-0 images (4, 3, 64, 64) in [0, 1]."""
    return np.stack([im.generate(int(i), 1, 64, 3)[0] for i in IDS])


def _both_ways(clean: np.ndarray, spec: Corruption, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(corrupt at level 0, then restrict) and (restrict, then corrupt at `level`)."""
    f = 2**level
    fine_first = average_pool(corrupt(clean, IDS, seed=SEED, level=0, spec=spec), f)
    coarse = corrupt(average_pool(clean, f), IDS, seed=SEED, level=level, spec=spec)
    return fine_first, coarse


@pytest.mark.parametrize("level", [1, 2, 3])
@pytest.mark.parametrize("spec", [
    Corruption(task="noise", sigma=0.2),
    Corruption(task="denoise"),
    Corruption(task="denoise", t_range=(0.2, 0.6)),
    Corruption(task="inpaint", sigma=0.05, boxes=(2, 5), fill=0.5)],
    ids=["noise", "denoise", "denoise-t", "inpaint"])
def test_corrupt_then_restrict_equals_restrict_then_corrupt(clean, spec: Corruption,
                                                            level: int) -> None:
    fine_first, coarse = _both_ways(clean, spec, level)
    assert coarse.shape == (4, 3, 64 >> level, 64 >> level)
    np.testing.assert_allclose(coarse, fine_first, atol=2e-6, rtol=0)
    # ... and the corruption did something at that level
    assert np.abs(coarse - average_pool(clean, 2**level)).mean() > 1e-3


def test_deblur_noise_is_exact_and_blur_close_on_levels_1_and_2(clean) -> None:
    spec = Corruption(task="deblur", sigma=0.05)
    blur_only = Corruption(task="deblur", sigma=0.0)
    for level, bound in ((1, 0.03), (2, 0.15)):  # measured 0.010 and 0.065 (0.74 at level 3)
        fine_first, coarse = _both_ways(clean, spec, level)
        blur_fine, blur_coarse = _both_ways(clean, blur_only, level)
        # The noise cancels exactly: what remains is the blur's own mismatch.
        np.testing.assert_allclose(fine_first - coarse, blur_fine - blur_coarse, atol=2e-6)
        restricted = average_pool(clean, 2**level)
        mismatch = np.linalg.norm(blur_fine - blur_coarse)
        effect = np.linalg.norm(blur_fine - restricted)
        assert mismatch < bound * effect, (level, mismatch / effect)


def test_blur_sigma_is_in_level_0_pixels() -> None:
    """A point at level 1 spreads with half the standard deviation it has at level 0."""
    point = np.zeros((1, 1, 64, 64), np.float32)
    point[..., 32, 32] = 1.0
    spec = Corruption(task="deblur", sigma=0.0, blur_sigma=4.0)
    for level in (0, 1):
        out = corrupt(point, [0], seed=0, level=level, spec=spec)[0, 0]
        profile = out[32]
        var = (profile * (np.arange(64) - 32.0) ** 2).sum() / profile.sum()
        assert abs(np.sqrt(var) - 4.0 / 2**level) < 0.05


def test_gaussian_blur_matches_torch_convolution_and_keeps_the_mean() -> None:
    x = np.random.default_rng(0).random((2, 1, 20, 24)).astype(np.float32)
    sigma = 1.3
    out = gaussian_blur(x, sigma)
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    k = torch.tensor(np.outer(taps, taps), dtype=torch.float32)[None, None]
    # numpy's "symmetric" pad repeats the edge pixel, torch's "reflect" does not
    padded = np.pad(x, [(0, 0), (0, 0), (radius, radius), (radius, radius)], mode="symmetric")
    want = F.conv2d(torch.from_numpy(padded), k).numpy()
    np.testing.assert_allclose(out, want, atol=1e-6)
    assert abs(gaussian_blur(np.ones((1, 1, 9, 9)), 1.0) - 1.0).max() < 1e-6


@pytest.mark.parametrize("level", [0, 1, 2])
def test_super_resolution_is_the_same_relative_task_at_every_level(clean, level: int) -> None:
    x = average_pool(clean, 2**level)
    spec = Corruption(task="sr")
    out = corrupt(x, IDS, seed=SEED, level=level, spec=spec)
    want = F.interpolate(F.avg_pool2d(torch.from_numpy(x), 2), scale_factor=2, mode="bilinear",
                         align_corners=False).numpy()
    np.testing.assert_allclose(out, want, atol=1e-6)
    half = corrupt(x, IDS, seed=SEED, level=level, spec=Corruption(task="sr", sr_input="half"))
    np.testing.assert_allclose(half, average_pool(x, 2), atol=1e-7)
    near = corrupt(x, IDS, seed=SEED, level=level,
                   spec=Corruption(task="sr", sr_prolong="nearest"))
    np.testing.assert_array_equal(near, prolong2(average_pool(x, 2), "nearest"))


def test_noisy_super_resolution_noise_is_the_restricted_level_0_noise(clean) -> None:
    half = Corruption(task="sr", sr_input="half", sigma=0.1)
    noise = Corruption(task="noise", sigma=0.1)
    x = average_pool(clean, 2)
    got = corrupt(x, IDS, seed=SEED, level=1, spec=half) - average_pool(x, 2)
    want = average_pool(corrupt(x, IDS, seed=SEED, level=1, spec=noise) - x, 2)
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_prolong2_matches_torch() -> None:
    x = np.random.default_rng(1).random((2, 3, 5, 6)).astype(np.float32)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(prolong2(x), F.interpolate(t, scale_factor=2, mode="bilinear",
                                                          align_corners=False).numpy(), atol=1e-6)
    np.testing.assert_array_equal(prolong2(x, "nearest"),
                                  F.interpolate(t, scale_factor=2, mode="nearest").numpy())


@pytest.mark.parametrize("task", ["noise", "denoise", "deblur", "inpaint", "sr"])
def test_a_samples_corruption_depends_on_its_id_and_seed_not_on_its_batch(clean, task) -> None:
    spec = Corruption(task=task, sigma=0.1)
    out = corrupt(clean, IDS, seed=SEED, level=0, spec=spec)
    order = [2, 0, 3, 1]
    shuffled = corrupt(clean[order], IDS[order], seed=SEED, level=0, spec=spec)
    np.testing.assert_array_equal(shuffled, out[order])
    alone = corrupt(clean[1:2], IDS[1:2], seed=SEED, level=0, spec=spec)
    np.testing.assert_array_equal(alone[0], out[1])
    other_seed = corrupt(clean, IDS, seed=SEED + 1, level=0, spec=spec)
    other_ids = corrupt(clean, IDS + 1, seed=SEED, level=0, spec=spec)
    assert not np.array_equal(other_seed, out) and not np.array_equal(other_ids, out)


def test_denoise_mixes_clean_image_and_unit_noise(clean) -> None:
    np.testing.assert_allclose(
        corrupt(clean, IDS, seed=0, level=0, spec=Corruption(task="denoise", t_range=(1, 1))),
        clean)
    pure = Corruption(task="denoise", t_range=(0.0, 0.0))
    for level in (0, 1, 2):
        z = corrupt(average_pool(clean, 2**level), IDS, seed=0, level=level, spec=pure)
        # level-0 unit noise averaged over 4^L pixels: standard deviation 2^-L
        assert abs(z.std() * 2**level - 1.0) < 0.05 and abs(z.mean()) < 0.05 / 2**level


def test_inpainting_boxes_are_aligned_and_hold_the_fill(clean) -> None:
    spec = Corruption(task="inpaint", sigma=0.0, fill=-1.0, boxes=(3, 3), box_align=8)
    out = corrupt(clean, IDS, seed=SEED, level=0, spec=spec)
    missing = out == -1.0  # clean values are in [0, 1]
    assert 0.01 < missing.mean() < 0.9
    blocks = missing.reshape(4, 3, 8, 8, 8, 8)
    assert np.all(blocks.all(axis=(3, 5)) == blocks.any(axis=(3, 5)))  # whole 8x8 cells
    none = Corruption(task="inpaint", sigma=0.0, boxes=(0, 0))
    np.testing.assert_array_equal(corrupt(clean, IDS, seed=SEED, level=0, spec=none), clean)


def test_inpainting_refuses_levels_its_alignment_cannot_keep_exact(clean) -> None:
    spec = Corruption(task="inpaint", box_align=2)
    with pytest.raises(ValueError, match="set box_align to a multiple of 4"):
        corrupt(average_pool(clean, 4), IDS, seed=0, level=2, spec=spec)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"task": "colorize"}, "use one of"),
    ({"task": "noise", "sigma": -1.0}, "sigma"),
    ({"task": "denoise", "t_range": (0.5, 0.2)}, "t_range"),
    ({"task": "deblur", "blur_sigma": 0.0}, "blur_sigma"),
    ({"task": "inpaint", "box_align": 6}, "power of 2"),
    ({"task": "inpaint", "box_fraction": (0.0, 0.5)}, "box_fraction"),
    ({"task": "sr", "sr_input": "quarter"}, "sr_input"),
    ({"task": "noise", "coarse": "pooled"}, "coarse = 'pooled': use 'restricted' or 'level'")])
def test_bad_settings_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Corruption(**kwargs)


def test_bad_batches_are_refused(clean) -> None:
    spec = Corruption(task="noise")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        corrupt(clean[0], IDS, seed=0, level=0, spec=spec)
    with pytest.raises(ValueError, match="3 sample ids for a batch of 4"):
        corrupt(clean, IDS[:3], seed=0, level=0, spec=spec)


@pytest.mark.parametrize("task", ["noise", "denoise"])
def test_noise_std_at_level_2_is_a_quarter_restricted_and_level_0s_at_level(task) -> None:
    """The std of the added noise at level 2, measured on a flat image: "restricted" averages
    level 0's noise over 4x4 blocks (1/4 of its std), "level" keeps level 0's std in level-2
    pixels, from the same draws (its noise is 4 times the restricted one)."""
    flat = np.full((64, 1, 64, 64), 0.5, np.float32)  # level 0: (B, C, 64, 64)
    ids = np.arange(64)
    kw: dict = {"sigma": 0.2} if task == "noise" else {"t_range": (0.5, 0.5)}
    stds = {}
    noise = {}
    for coarse in ("restricted", "level"):
        spec = Corruption(task=task, coarse=coarse, **kw)
        level0 = corrupt(flat, ids, seed=SEED, level=0, spec=spec)
        level2 = corrupt(average_pool(flat, 4), ids, seed=SEED, level=2, spec=spec)
        stds[coarse] = (float(level0.std()), float(level2.std()))
        noise[coarse] = level2 - level2.mean()
    fine = 0.2 if task == "noise" else 0.5  # level 0's std: sigma, or (1 - t) for denoise
    for coarse in stds:
        assert stds[coarse][0] == pytest.approx(fine, rel=0.02)  # level 0 alike
    assert stds["restricted"][1] == pytest.approx(fine / 4, rel=0.03)
    assert stds["level"][1] == pytest.approx(fine, rel=0.03)
    np.testing.assert_allclose(noise["level"], 4 * noise["restricted"], atol=1e-5)


def test_level_blur_is_blur_sigma_level_pixels_at_every_level(clean) -> None:
    """deblur with coarse "level": at level 2 the blur is blur_sigma level-2 pixels (what
    level 0 does in its own pixels), not blur_sigma / 4 as the restriction gives."""
    coarse_clean = average_pool(clean, 4)  # (4, 3, 16, 16)
    for coarse, pixels in (("restricted", 0.75), ("level", 3.0)):
        spec = Corruption(task="deblur", sigma=0.0, blur_sigma=3.0, coarse=coarse)
        got = corrupt(coarse_clean, IDS, seed=SEED, level=2, spec=spec)
        np.testing.assert_allclose(got, gaussian_blur(coarse_clean, pixels), atol=1e-6)
    # level 0 does not depend on the setting
    spec0 = [corrupt(clean, IDS, seed=SEED, level=0,
                     spec=Corruption(task="deblur", coarse=c)) for c in ("restricted", "level")]
    np.testing.assert_array_equal(*spec0)
