"""Tests for the multiscale gradient estimator (hpc_multires.methods.mge).

The unbiasedness test compares the mean of many MGE gradients with the full-dataset fine-level
gradient of a fixed small model on a fixed small dataset. The tolerance comes from the exact
variance of the estimate, computed from per-sample gradients: each level's batch is a uniform
draw of n_l of the N samples without replacement, so its mean has covariance
Cov_pop / n_l * (N - n_l) / (N - 1), and independent levels add. Each coordinate of the mean of
M draws is then, to a good approximation (central limit theorem over M = 200 draws), normal
with standard error SE_j = sqrt(Var_j / M); the test requires every coordinate within 4.5 SE
of the fine gradient, which an unbiased estimator misses with probability at most
d * P(|N(0,1)| > 4.5) = 373 * 6.8e-6 < 0.3% (union bound over the d = 373 parameters,
whatever their correlation). Biased estimators miss it by far (asserted).
Run with `-s` to see the variance figures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpc_multires.data.corrupt import Corruption, average_pool, corrupt
from hpc_multires.data.synth import images as im
from hpc_multires.methods.mge import (
    RestrictMode,
    draw_level_indices,
    level_batch_sizes,
    mge_loss,
    mge_step_cost,
    restrict,
    split_level_indices,
    uniform_sampler,
)
from hpc_multires.models.resnet2d import ResNet2d

N, SIZE, LEVELS, DRAWS = 32, 16, 3, 200
SIZES = level_batch_sizes(4, LEVELS, 2.0)  # [4, 8, 16]


def _grad(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


@pytest.fixture(scope="module")
def problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny denoiser (373 parameters, float64) and N noisy/clean 16x16 image pairs."""
    torch.manual_seed(0)
    clean = np.stack([im.generate(i, 3, SIZE, 1)[0] for i in range(N)])
    noisy = corrupt(clean, np.arange(N), seed=0, level=0, spec=Corruption(task="noise",
                                                                          sigma=0.2))
    model = ResNet2d(in_channels=1, channels=4, blocks=1, norm="none").double()
    return model, torch.from_numpy(noisy).double(), torch.from_numpy(clean).double()


def _levels(x: torch.Tensor, mode: RestrictMode) -> list[torch.Tensor]:
    return [restrict(x, mode, level) for level in range(LEVELS)]


def _exact_variance(model: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor],
                    mode: RestrictMode) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """Per-coordinate variance of one MGE draw with SIZES, each level's trace, and the
    per-sample fine gradients (N, d)."""
    def per_sample(level: int, restricted: bool) -> torch.Tensor:
        rows = []
        for i in range(N):
            x, y = xs[level][i:i + 1], ys[level][i:i + 1]
            if restricted:
                x, y = restrict(x, mode), restrict(y, mode)
            rows.append(_grad(model, F.mse_loss(model(x), y)))
        return torch.stack(rows)  # (N, d)

    var = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    traces = []
    fine = per_sample(0, False)
    for level, n in enumerate(SIZES):
        g = fine if level == 0 else per_sample(level, False)
        term = g - per_sample(level, True) if level < LEVELS - 1 else g  # (N, d)
        v = term.var(0, unbiased=False) / n * (N - n) / (N - 1)
        traces.append(float(v.sum()))
        var += v
    return var, traces, fine


def _plain_trace(fine: torch.Tensor, n: int) -> float:
    """Trace of the covariance of the plain fine gradient of a batch of n (of N)."""
    return float(fine.var(0, unbiased=False).sum() / n * (N - n) / (N - 1))


@pytest.mark.parametrize("mode", ["avg", "bilinear"])
def test_mge_gradient_is_unbiased_with_the_variance_of_independent_levels(problem, mode) -> None:
    model, x, y = problem
    xs, ys = _levels(x, mode), _levels(y, mode)
    target = _grad(model, F.mse_loss(model(x), y))  # full-dataset fine gradient (d,)
    var, traces, fine = _exact_variance(model, xs, ys, mode)
    # per-sample gradients average to the full gradient: the loss is a mean over samples
    torch.testing.assert_close(fine.mean(0), target)

    sample = uniform_sampler(N, np.random.default_rng(1))
    draws, coarse_only = [], []
    for _ in range(DRAWS):
        idx = draw_level_indices(sample, SIZES)
        batches = [(xs[lv][i], ys[lv][i]) for lv, i in enumerate(idx)]
        draws.append(_grad(model, mge_loss(model, F.mse_loss, batches, mode).loss))
        k = LEVELS - 1
        coarse_only.append(_grad(model, F.mse_loss(model(xs[k][idx[k]]), ys[k][idx[k]])))
    g = torch.stack(draws)  # (M, d)
    se = (var / DRAWS).sqrt()
    z = (g.mean(0) - target) / se
    measured = float(g.var(0).sum())
    cost = mge_step_cost(SIZES)
    plain = _plain_trace(fine, round(cost))
    print(f"\nMGE ({mode}), batches {SIZES}, cost {cost} level-0 samples: trace of the "
          f"gradient covariance {sum(traces):.3e} exact ({measured:.3e} measured over "
          f"{DRAWS} draws), per level {[f'{t:.2e}' for t in traces]}; plain level-0 batch "
          f"of {round(cost)}: {plain:.3e} ({plain / sum(traces):.1f}x MGE); |fine grad|^2 "
          f"{float(target.square().sum()):.3f}; max |z| {float(z.abs().max()):.2f}")
    assert float(z.abs().max()) < 4.5
    # The draws' spread is the one independent levels give (a shared draw would change it).
    assert 0.75 < measured / sum(traces) < 1.33
    # The same check rejects a biased estimator: the coarsest level's gradient alone.
    z_coarse = (torch.stack(coarse_only).mean(0) - target) / se
    print(f"coarsest level alone: max |z| {float(z_coarse.abs().max()):.0f}")
    assert float(z_coarse.abs().max()) > 100  # measured 429 (avg), 463 (bilinear)


def test_a_restriction_other_than_the_one_that_made_the_levels_is_biased(problem) -> None:
    """Levels made by averaging, corrections restricted bilinearly: the telescoping sum no
    longer cancels, and the unbiasedness check sees it."""
    model, x, y = problem
    xs, ys = _levels(x, "avg"), _levels(y, "avg")
    target = _grad(model, F.mse_loss(model(x), y))
    sample = uniform_sampler(N, np.random.default_rng(2))
    draws = 100
    g = torch.stack([
        _grad(model, mge_loss(model, F.mse_loss,
                              [(xs[lv][i], ys[lv][i]) for lv, i in
                               enumerate(draw_level_indices(sample, SIZES))],
                              "bilinear").loss)
        for _ in range(draws)])
    z = (g.mean(0) - target) / (g.var(0) / draws).sqrt()
    print(f"\nbilinear corrections on averaged levels: max |z| {float(z.abs().max()):.1f}")
    assert float(z.abs().max()) > 8  # measured 12.8


def test_each_level_draws_its_own_batch_of_its_own_size() -> None:
    sample = uniform_sampler(1000, np.random.default_rng(0))
    for _ in range(20):
        idx = draw_level_indices(sample, [16, 32, 64])
        assert [len(i) for i in idx] == [16, 32, 64]
        assert all(len(np.unique(i)) == len(i) for i in idx)
        # not the same samples reused: no level's set inside another's
        sets = [set(i.tolist()) for i in idx]
        assert not (sets[0] <= sets[1] or sets[1] <= sets[2] or sets[0] <= sets[2])


def test_a_sampler_that_repeats_indices_is_refused() -> None:
    with pytest.raises(ValueError, match="4 distinct indices"):
        draw_level_indices(lambda n: np.zeros(n, np.int64), [4])


def test_split_level_indices_cuts_a_global_batch_into_disjoint_rank_slices() -> None:
    batch = np.random.default_rng(0).permutation(100)[:28]  # sizes 4 + 8 + 16
    parts = [split_level_indices(batch, [4, 8, 16], rank, 2) for rank in (0, 1)]
    assert [len(p) for p in parts[0]] == [2, 4, 8]
    for level, n in enumerate([4, 8, 16]):
        both = np.concatenate([parts[0][level], parts[1][level]])
        start = sum([4, 8, 16][:level])
        np.testing.assert_array_equal(both, batch[start:start + n])
    with pytest.raises(ValueError, match="not all divisible by 3 ranks"):
        split_level_indices(batch, [4, 8, 16], 0, 3)
    with pytest.raises(ValueError, match="take sum.sizes. = 28"):
        split_level_indices(batch[:20], [4, 8, 16])


def test_mge_loss_is_the_telescoping_sum_over_its_own_batches(problem) -> None:
    model, x, y = problem
    xs, ys = _levels(x, "avg"), _levels(y, "avg")
    idx = [np.array([0, 1]), np.array([2, 3, 4]), np.array([5, 6, 7, 8])]
    out = mge_loss(model, F.mse_loss, [(xs[lv][i], ys[lv][i]) for lv, i in enumerate(idx)])

    def loss(level: int, i: np.ndarray) -> torch.Tensor:
        return F.mse_loss(model(xs[level][i]), ys[level][i])

    want = [loss(0, idx[0]) - loss(1, idx[0]), loss(1, idx[1]) - loss(2, idx[1]), loss(2, idx[2])]
    torch.testing.assert_close(torch.stack(list(out.terms)), torch.stack(want).detach())
    torch.testing.assert_close(out.loss, sum(want))
    assert not any(t.requires_grad for t in out.terms) and out.loss.requires_grad


def test_the_same_samples_at_every_level_collapse_to_the_plain_fine_gradient(problem) -> None:
    """Why each level needs its own draw: reusing one batch everywhere telescopes on the
    samples themselves, leaving the fine gradient of that one small batch."""
    model, x, y = problem
    xs, ys = _levels(x, "avg"), _levels(y, "avg")
    same = np.array([3, 9, 27, 30])
    out = mge_loss(model, F.mse_loss, [(xs[lv][same], ys[lv][same]) for lv in range(LEVELS)])
    plain = F.mse_loss(model(x[same]), y[same])
    torch.testing.assert_close(_grad(model, out.loss), _grad(model, plain))


def test_one_level_is_the_plain_gradient(problem) -> None:
    model, x, y = problem
    i = np.array([1, 5, 7])
    out = mge_loss(model, F.mse_loss, [(x[i], y[i])])
    torch.testing.assert_close(_grad(model, out.loss),
                               _grad(model, F.mse_loss(model(x[i]), y[i])))
    assert len(out.terms) == 1


def test_labels_are_not_restricted() -> None:
    """A regression target (B, P) stays as it is at the coarser level."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 3, padding=1), nn.AdaptiveAvgPool1d(1), nn.Flatten())
    x, labels = torch.rand(4, 1, 8), torch.rand(4, 2)
    out = mge_loss(model, F.mse_loss, [(x, labels), (restrict(x), labels)],
                   restrict_targets=False)
    want = (F.mse_loss(model(x), labels) - F.mse_loss(model(restrict(x)), labels)
            + F.mse_loss(model(restrict(x)), labels))
    torch.testing.assert_close(out.loss, want)


def test_restriction_operators() -> None:
    x = torch.rand(2, 3, 8, 12)
    torch.testing.assert_close(restrict(x, "avg", 2),
                               torch.from_numpy(average_pool(x.numpy(), 4)))
    torch.testing.assert_close(restrict(x, "nearest"), x[:, :, ::2, ::2])
    line = torch.zeros(1, 1, 4, 16)
    line[..., 7] = 1.0
    torch.testing.assert_close(restrict(line, "bilinear")[0, 0, 0, 2:6],
                               torch.tensor([0.0, 3 / 8, 1 / 8, 0.0]))
    # plain bilinear at scale 1/2 would be the average: this one is wider
    assert not torch.allclose(restrict(x, "bilinear"), restrict(x, "avg"))
    assert restrict(torch.rand(1, 2, 8, 8, 8), "avg").shape == (1, 2, 4, 4, 4)
    assert restrict(torch.rand(1, 2, 16), "nearest", 3).shape == (1, 2, 2)
    with pytest.raises(ValueError, match="use 'avg' or 'nearest'"):
        restrict(torch.rand(1, 1, 8), "bilinear")
    with pytest.raises(ValueError, match="divisible by 2"):
        restrict(torch.rand(1, 1, 6, 6), "avg", 2)
    with pytest.raises(ValueError, match="use one of"):
        restrict(x, "cubic")  # type: ignore[arg-type]


def test_batch_sizes_and_step_cost() -> None:
    assert level_batch_sizes(4, 3, 2.0) == [4, 8, 16]
    assert level_batch_sizes(16, 3, 4.0) == [16, 64, 256]
    assert level_batch_sizes(8, 1) == [8]
    with pytest.raises(ValueError, match=">= 1"):
        level_batch_sizes(8, 2, 0.5)
    # 4 * (1 + 1/4) + 8 * (1/4 + 1/16) + 16 / 16
    assert mge_step_cost([4, 8, 16]) == 8.5
    assert mge_step_cost([4]) == 4.0
    assert mge_step_cost([8, 8], dims=3) == 8 * (1 + 1 / 8) + 1.0
