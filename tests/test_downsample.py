"""Dynamic input and kernel downsampling: which steps, and what a coarse step computes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpc_multires.errors import ConfigError
from hpc_multires.methods.downsample import (
    downsample_decision,
    downsampled,
    pool_kernel,
    restrict_input,
)
from hpc_multires.models.meshfree import MeshFreeConv1d

TOTAL = 2000
SETTINGS = [("random", 0.25, None), ("every", 0.3, None), ("every", 0.5, 4),
            ("decay", 0.25, None), ("decay", 0.75, None)]

# What another rank computes: a fresh interpreter with its own hash seed, so a decision
# that leaned on Python's per-process str hash or on any random state would differ.
RANK_SCRIPT = f"""
import json, sys
from hpc_multires.methods.coarse_steps import downsample_decision
settings = json.loads(sys.argv[1])
print(json.dumps([[downsample_decision(7, s, {TOTAL}, f, name, every) for s in range({TOTAL})]
                  for name, f, every in settings]))
assert "torch" not in sys.modules  # deciding stays cheap: no torch to import
"""


def _decisions(seed: int, name: str, fraction: float, every: int | None) -> list[bool]:
    return [downsample_decision(seed, s, TOTAL, fraction, name, every) for s in range(TOTAL)]


def test_every_rank_takes_the_same_decisions() -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, json.dumps(SETTINGS)],
                              env={**env, "PYTHONHASHSEED": str(rank)}, stdout=subprocess.PIPE,
                              text=True) for rank in (1, 2)]
    outputs = [json.loads(rank.communicate(timeout=60)[0]) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0]
    here = [_decisions(7, name, f, every) for name, f, every in SETTINGS]
    assert outputs[0] == outputs[1] == here


def test_realised_share_matches_the_schedule() -> None:
    lines = []
    for name, fraction, every in SETTINGS:
        taken = _decisions(7, name, fraction, every)
        share = sum(taken) / TOTAL
        first, second = sum(taken[:TOTAL // 2]), sum(taken[TOTAL // 2:])
        lines.append(f"{name:6s} fraction {fraction:.2f} every {every}: realised {share:.4f} "
                     f"(first half {first}, second half {second})")
        if name == "random":
            # binomial: 3 standard deviations are 0.029 at 2000 steps
            assert abs(share - fraction) < 3 * math.sqrt(fraction * (1 - fraction) / TOTAL)
            assert taken != _decisions(8, name, fraction, every)  # the seed matters
        elif name == "every":
            period = every or round(1 / fraction)
            assert taken == [s % period == 0 for s in range(TOTAL)]
        else:
            assert sum(taken) == math.ceil(fraction * TOTAL)  # exact over the run
            assert first > 1.2 * second  # falls over training
            if fraction > 0.5:  # the share starts at 1
                assert all(taken[:TOTAL // 40])
    print("\n" + "\n".join(lines))
    for name in ("random", "every", "decay"):
        assert not any(_decisions(7, name, 0.0, None))
        assert all(_decisions(7, name, 1.0, None))
    # a stage extended on resume keeps the final share of decay: 0 below one half
    assert not any(downsample_decision(7, s, TOTAL, 0.25, "decay") for s in range(TOTAL, 2500))


@pytest.mark.parametrize("fraction", [-0.1, 1.5, math.nan, "0.5"])
def test_fraction_outside_0_1_is_refused(fraction: float) -> None:
    with pytest.raises(ConfigError, match="train.downsample.fraction") as raised:
        downsample_decision(0, 0, 10, fraction)
    assert "\n" not in str(raised.value)


def test_other_settings_are_refused() -> None:
    for call, key in [(lambda: downsample_decision(0, 0, 10, 0.5, "sometimes"), "schedule"),
                      (lambda: downsample_decision(0, 0, 10, 0.5, "every", 0), "every"),
                      (lambda: restrict_input(torch.zeros(1, 1, 10), 3), "factor"),
                      (lambda: restrict_input(torch.zeros(1, 1, 8), 0), "factor")]:
        with pytest.raises(ConfigError, match=f"train.downsample.{key}") as raised:
            call()
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("weight_shape", "factor", "mode", "match"), [
    ((2, 3, 3), 0, "avg", "factor 0"),
    ((2, 3, 3), 1.5, "avg", "factor 1.5"),
    ((2, 3, 3), True, "avg", "factor True"),
    ((2, 3, 3), 2, "nearest", "kernel_pool = 'nearest'"),
    ((2, 3), 2, "avg", "Conv1d/2d/3d weight"),
    ((1, 1, 3, 3, 3, 3), 2, "avg", "Conv1d/2d/3d weight"),
])
def test_pool_kernel_errors_are_one_line(weight_shape: tuple[int, ...], factor: int, mode: str,
                                         match: str) -> None:
    with pytest.raises(ConfigError, match=match) as raised:
        pool_kernel(torch.zeros(weight_shape), factor, mode)
    assert "\n" not in str(raised.value)


def test_pool_kernel_sizes_and_trivial_cases() -> None:
    w = torch.randn(4, 2, 7)
    assert pool_kernel(w, 2, "avg").shape[-1] == 5  # 2 floor(3/2 + 1/2) + 1
    assert pool_kernel(w, 3, "bilinear").shape[-1] == 3  # 2 ceil(3/3) + 1
    assert pool_kernel(torch.randn(1, 1, 4), 2).shape[-1] == 3  # even: taps -1 .. 2 -> -1 .. 1
    assert torch.equal(pool_kernel(w, 1), w)
    # one tap commutes with averaging: returned as it is
    pointwise = torch.randn(3, 2, 1, 1)
    assert torch.equal(pool_kernel(pointwise, 4, "bilinear"), pointwise)
    # both modes keep the sum (the response to a constant); bilinear the first moment too
    for mode in ("avg", "bilinear"):
        assert torch.allclose(pool_kernel(w, 3, mode).sum(-1), w.sum(-1), atol=1e-6)
    taps = torch.arange(-3, 4, dtype=torch.float32)
    coarse = pool_kernel(w, 3, "bilinear")
    assert torch.allclose((coarse * 3 * torch.arange(-1, 2)).sum(-1), (w * taps).sum(-1),
                          atol=1e-5)


def _smooth(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A smooth random field of (1, 2, *shape): waves of at most 2 cycles per axis on the
    unit cube, at least 12 points per cycle on every coarse grid below."""
    axes = torch.meshgrid(*[(torch.arange(n, dtype=torch.float64) + 0.5) / n for n in shape],
                          indexing="ij")
    out = torch.zeros(1, 2, *shape, dtype=torch.float64)
    for c in range(2):
        for _ in range(6):
            k = 2 * math.pi * torch.randint(-2, 3, (len(shape),), generator=gen).double()
            phase = sum(ki * x for ki, x in zip(k, axes, strict=True))
            out[0, c] += torch.randn(1, generator=gen, dtype=torch.float64) * torch.cos(phase + c)
    return out


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(("shape", "size", "factor", "mode"), [
    ((256,), 5, 2, "avg"), ((256,), 5, 4, "bilinear"), ((256,), 4, 2, "avg"),
    ((64, 64), 3, 2, "avg"), ((128, 128), 7, 4, "bilinear"), ((48, 48, 48), 3, 2, "bilinear"),
])
def test_pooled_kernel_on_the_restricted_input_matches_the_restricted_output(
        shape: tuple[int, ...], size: int, factor: int, mode: str) -> None:
    gen = torch.Generator().manual_seed(size + factor)
    x = _smooth(shape, gen)
    w = torch.randn(3, 2, *[size] * len(shape), generator=gen, dtype=torch.float64)
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(shape) - 1]
    fine = restrict_input(conv(x, w, padding="same"), factor)
    pooled = conv(restrict_input(x, factor), pool_kernel(w, factor, mode), padding="same")
    unpooled = conv(restrict_input(x, factor), w, padding="same")
    inner = (..., *[slice(2, n // factor - 2) for n in shape])  # zero padding at the edges

    def error(a: torch.Tensor) -> float:
        return float((a[inner] - fine[inner]).norm() / fine[inner].norm())

    print(f"\n{shape} k={size} f={factor} {mode}: pooled kernel {error(pooled):.2e}, "
          f"full kernel on the coarse grid {error(unpooled):.2e}")
    assert error(pooled) < 0.05 and error(pooled) < error(unpooled) / 5
    # set back into the full shape, the pooled kernel runs with the layer's own padding
    kept = pool_kernel(w, factor, mode, keep_size=True)
    assert kept.shape == w.shape
    assert torch.allclose(conv(restrict_input(x, factor), kept, padding="same"), pooled)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 3, 5, padding=2), nn.BatchNorm1d(3), nn.Tanh(),
        nn.Conv1d(3, 2, 4, padding="same"), nn.Tanh(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2, 1)).double()


def test_coarse_step_gradients_reach_the_full_size_kernels() -> None:
    model = _tiny_model()
    params = list(model.parameters())
    x = torch.randn(4, 2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    coarse_x = restrict_input(x, 2)  # (4, 2, 8)

    def loss() -> torch.Tensor:
        with downsampled(model, 2, "bilinear") as m:
            return ((m(coarse_x) - y) ** 2).mean()

    grads = torch.autograd.grad(loss(), [model[0].weight, model[3].weight])
    for weight, grad in zip([model[0].weight, model[3].weight], grads, strict=True):
        assert weight.shape[-1] in (5, 4)  # the full-size kernels, restored
        assert grad.abs().min() > 0  # every tap, the pooled-together ones included
        numeric = torch.zeros_like(weight)
        with torch.no_grad():
            for i in range(weight.numel()):
                flat = weight.view(-1)
                flat[i] += 1e-6
                up = loss()
                flat[i] -= 2e-6
                down = loss()
                flat[i] += 1e-6
                numeric.view(-1)[i] = (up - down) / 2e-6
        assert torch.allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    # the model is itself again: same parameter objects, names and outputs
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == list(_tiny_model().state_dict())
    assert torch.allclose(model(x), _tiny_model()(x))
    # the coarse step computes what the pooled kernels compute, with the layer's padding
    with downsampled(model, 2, "bilinear"):
        inside = model[0](coarse_x)
    pooled = pool_kernel(model[0].weight, 2, "bilinear")
    assert torch.allclose(inside, F.conv1d(coarse_x, pooled, model[0].bias, padding=1))


def test_backward_inside_fills_the_gradients_an_optimizer_holds() -> None:
    # An optimizer (or DDP) built before the block holds these very parameter objects.
    model = _tiny_model()
    params = list(model.parameters())
    x = restrict_input(torch.randn(4, 2, 16, dtype=torch.float64), 2)
    with downsampled(model, 2) as m:
        m(x).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_the_nodes_that_accumulate_gradients_stay_those_ddp_hooked() -> None:
    """DDP and Horovod hook each parameter's gradient accumulator when they are built. The
    block must leave those nodes in place: torch's parametrize re-sets each weight with
    set_(), which gives it a new one, and DDP then never saw the pooled layers' gradients
    (a 2-rank run failed at the step after the first coarse one)."""
    model = _tiny_model()

    def accumulators() -> list[object]:
        return [p.view_as(p).grad_fn.next_functions[0][0] for p in model.parameters()]

    before = accumulators()
    fired: list[int] = []
    hooks = [node.register_hook(lambda *_, i=i: fired.append(i))  # type: ignore[attr-defined]
             for i, node in enumerate(before)]
    x = restrict_input(torch.randn(4, 2, 16, dtype=torch.float64), 2)
    with downsampled(model, 2) as m:
        assert all(a is b for a, b in zip(accumulators(), before, strict=True))
        loss = m(x).pow(2).mean()
    loss.backward()  # after the block, as the training loop does
    assert sorted(fired) == list(range(len(before)))  # every hooked node saw its gradient
    assert all(a is b for a, b in zip(accumulators(), before, strict=True))
    for hook in hooks:
        hook.remove()


@torch.no_grad()
def test_meshfree_layers_change_their_spacing_instead() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MeshFreeConv1d(2, 3, spacing=1 / 128, scale=1 / 32), nn.Tanh(),
                          nn.Conv1d(3, 3, 1)).double()
    x = _smooth((128,), torch.Generator().manual_seed(5))
    fine = restrict_input(model(x), 2)
    with downsampled(model, 2):
        assert model[0].spacing == 1 / 64
        coarse = model(restrict_input(x, 2))
    assert model[0].spacing == 1 / 128
    inner = (..., slice(8, -8))
    assert float((coarse - fine)[inner].norm() / fine[inner].norm()) < 1e-3


def test_dilated_convolutions_are_refused() -> None:
    model = nn.Sequential(nn.Conv1d(1, 1, 3, dilation=2, padding=2))
    with pytest.raises(ConfigError, match="dilated") as raised, downsampled(model, 2):
        pass
    assert "\n" not in str(raised.value)
    assert "_conv_forward" not in vars(model[0])


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_restrict_input_averages_blocks(dims: int) -> None:
    x = torch.arange(4.0**dims).view(1, 1, *[4] * dims)
    coarse = restrict_input(x, 2)
    assert coarse.shape == (1, 1, *[2] * dims)
    assert float(coarse.mean()) == pytest.approx(float(x.mean()))
    assert float(coarse.flatten()[0]) == float(x[(0, 0, *[slice(0, 2)] * dims)].mean())
