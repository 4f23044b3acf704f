"""Which steps of a stage train on downsampled inputs (dynamic downsampling).

Pure functions of (seed, step) and the configured schedule, with no random state and no
torch: every rank takes the same decision without talking, a resumed run repeats the
uninterrupted run's decisions, and the plan can count a stage's coarse steps before
anything runs. What a coarse step computes is in `hpc_multires.methods.downsample`.
"""

from __future__ import annotations

import hashlib
import math

from hpc_multires.errors import ConfigError

SCHEDULES = ("random", "every", "decay")
KERNEL_POOLS = ("avg", "bilinear")


def check_downsample(fraction: float, factor: int, schedule: str = "random",
                     kernel_pool: str = "avg", every: int | None = None) -> None:
    """Refuse settings that cannot work, naming the `train.downsample` key and the fix."""
    if not (isinstance(fraction, int | float) and 0.0 <= fraction <= 1.0):
        raise ConfigError(f"train.downsample.fraction = {fraction!r} is the share of steps "
                          "that train on downsampled inputs; use a number in [0, 1]")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ConfigError(f"train.downsample.factor = {factor!r}: use an integer >= 1, the "
                          "points averaged per axis on a downsampled step (2 = one level)")
    if schedule not in SCHEDULES:
        raise ConfigError(f"train.downsample.schedule = {schedule!r}; use one of "
                          f"{', '.join(SCHEDULES)}")
    if kernel_pool not in KERNEL_POOLS:
        raise ConfigError(f"train.downsample.kernel_pool = {kernel_pool!r}; use one of "
                          f"{', '.join(KERNEL_POOLS)}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                              or every < 1):
        raise ConfigError(f"train.downsample.every = {every!r}: use an integer >= 1 (every "
                          "n-th step is downsampled) or leave it out to take round(1/fraction)")


def downsample_decision(seed: int, step: int, total_steps: int, fraction: float,
                        schedule: str = "random", every: int | None = None) -> bool:
    """Whether optimizer step `step` (0-based, counted over the whole stage) trains on
    downsampled inputs. A pure function of its arguments: no random state, so all ranks
    agree and a resumed run repeats the decisions.

    random: a Bernoulli(fraction) draw from a hash of (seed, step).
    every:  every n-th step, steps 0, n, 2n, ...; n = `every`, or round(1/fraction)
            (realised share 1/n; fraction 0 never downsamples).
    decay:  the share falls linearly over `total_steps` from a = min(1, 2 fraction) to
            b = 2 fraction - a, so it averages to `fraction` (2 fraction -> 0 for fraction
            <= 1/2); deterministic: step s is coarse when ceil(F(s + 1)) > ceil(F(s)),
            F(s) the integral of the share over the first s steps, so those steps hold
            ceil(F(s)) coarse ones (step 0 is one) and a whole run
            ceil(fraction * total_steps). Steps past `total_steps` (a stage extended on
            resume) keep the final share b.
    """
    check_downsample(fraction, 1, schedule, "avg", every)
    if step < 0 or total_steps < 1:
        raise ValueError(f"step {step} of {total_steps}: steps count from 0, totals from 1")
    if schedule == "random":
        digest = hashlib.blake2b(f"downsample:{seed}:{step}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2.0**64 < fraction
    if schedule == "every":
        if every is None:
            if fraction == 0:
                return False
            every = max(1, math.floor(1 / fraction + 0.5))
        return step % every == 0
    start = min(1.0, 2 * fraction)
    end = 2 * fraction - start

    def coarse_so_far(s: int) -> int:
        t = min(s, total_steps)
        area = start * t - (start - end) * t * t / (2 * total_steps) + end * (s - t)
        return math.ceil(area - 1e-9)  # the tolerance keeps exact integers exact

    return coarse_so_far(step + 1) > coarse_so_far(step)
