"""What a stage plan costs, counted in level-0 epochs on all ranks, before anything runs.

The unit is the baseline's: one epoch at level 0 on the whole world. A level-L epoch does
`c_L` of that work, ideally 2^(-d L) for samples with d spatial (or time) axes, since each
level averages 2 points per axis; a measured value can replace the ideal one (per-step
overheads that do not shrink with the input keep it higher). A stage on n of the P ranks
takes P / n times as long per epoch as it would on all of them, and stages of one wave run
side by side, so a wave takes as long as its longest stage. That holds when every rank has
its own devices, as on a cluster; when all ranks share the same cores (a workstation, an
oversubscribed node) the cores do the work of every concurrent stage, which adds up.

A stage with the MGE estimator does, per step, the work `methods.mge.mge_step_cost` counts
(each correction evaluates its batch at two levels) instead of one global batch at its
level; a stage sized in `train.steps` lasts steps / (steps per epoch) epochs, known once
the training set's size is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hpc_multires.errors import ConfigError
from hpc_multires.methods.mge import level_batch_sizes, mge_step_cost
from hpc_multires.plan.stages import Stage
from hpc_multires.train.config import DownsampleConfig


@dataclass(frozen=True)
class StageCost:
    """One stage's share of the plan, in level-0 epochs on all ranks."""

    name: str
    wave: int
    epochs: float
    per_epoch: float
    capped: bool  # the stage has a time budget: its epochs are an upper bound
    windowed: bool = False  # the stage trains on windows smaller than its samples
    downsampled: bool = False  # some of its steps train on downsampled inputs

    @property
    def total(self) -> float:
        return self.epochs * self.per_epoch


def level_work(level: int, spatial_dims: int, measured: Mapping[int, float]) -> float:
    """Work of one level-`level` epoch relative to a level-0 epoch on the same ranks."""
    if level in measured:
        return measured[level]
    return 2.0 ** (-spatial_dims * level)


def parse_level_costs(text: str) -> dict[int, float]:
    """`"1=0.73,2=0.6"` -> {1: 0.73, 2: 0.6} (the --level-cost option)."""
    out: dict[int, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        level, sep, value = item.partition("=")
        try:
            lv, cost = int(level), float(value)
        except ValueError:
            lv, cost = -1, -1.0
        if not sep or lv < 1 or not 0 < cost < math.inf:  # also refuses nan
            raise ConfigError(
                f"--level-cost {text!r}: write LEVEL=COST pairs separated by commas, each level "
                "an integer >= 1 and each cost a positive number, the time of one epoch at "
                "that level over the time of one at level 0 (e.g. 1=0.73,2=0.6)")
        if lv in out:
            raise ConfigError(f"--level-cost {text!r} gives level {lv} twice; give each level "
                              "one cost")
        out[lv] = cost
    return out


def window_work(crop: int, spatial: Sequence[int] | None) -> float:
    """Work of a stage on windows of `crop` points per axis relative to whole samples of
    `spatial` size (1 for whole samples, or where the size is not known)."""
    if not crop or not spatial:
        return 1.0
    return math.prod(min(crop, n) / n for n in spatial)


def estimator_work(stage: Stage, spatial_dims: int) -> float:
    """Work of one of the stage's steps relative to one global batch at its level (1 for the
    single-level estimator)."""
    t = stage.train
    if t.estimator != "mge":
        return 1.0
    sizes = level_batch_sizes(t.global_batch, t.mge_levels, t.mge_growth)
    return mge_step_cost(sizes, spatial_dims) / t.global_batch


def stage_epochs(stage: Stage, train_samples: int | None) -> float:
    """The stage's length in epochs: train.epochs, or train.steps over the steps per epoch
    (train.epochs where the training set's size is not known)."""
    t = stage.train
    if not t.steps or not train_samples:
        return float(t.epochs)
    return t.steps / max(1, train_samples // t.global_batch)


def downsample_work(down: DownsampleConfig, spatial_dims: int) -> float:
    """Work of an epoch with dynamic downsampling relative to one without: its share of
    downsampled steps at 1/factor^d of a step's work (the "every" schedule's share is 1/n;
    the others average `fraction`)."""
    if not down.on:
        return 1.0
    share = down.fraction
    if down.schedule == "every":
        share = 1 / (down.every or max(1, math.floor(1 / down.fraction + 0.5)))
    return 1 - share + share * float(down.factor) ** -spatial_dims


def plan_cost(stages: Sequence[Stage], world: int, spatial_dims: int,
              measured: Mapping[int, float] | None = None,
              shared: bool = False,
              spatial: Mapping[int, Sequence[int]] | None = None,
              train_samples: int | None = None,
              subdomain_share: float = 1.0
              ) -> tuple[list[StageCost], dict[int, float]]:
    """Each stage's cost and each wave's, in level-0 epochs on `world` ranks. `measured`
    maps levels to measured epoch-time ratios that replace 2^(-d L); `spatial` maps levels
    to their sample size (for stages on windows, whose work is the windows' share);
    `train_samples`, the training set's size (for stages sized in steps);
    `subdomain_share`, a sub-domain's share of a sample (domain decomposition: its local
    and coherent stages read only their sub-domains; its aggregator, on the local outputs,
    is counted as free).

    Each rank on its own devices (`shared` false): a stage on n ranks takes world / n times
    as long per epoch, and a wave lasts as long as its longest stage. All ranks on the same
    cores (`shared` true): those cores do every stage's work, so a stage costs its work
    whatever its ranks, and a wave costs the sum of its stages.
    """
    measured = measured or {}
    costs = []
    for s in stages:
        share = window_work(s.config.crop, (spatial or {}).get(s.level))
        if s.phase:
            share *= 0.0 if s.phase == "aggregator" else subdomain_share
        coarse = downsample_work(s.train.downsample, spatial_dims)
        costs.append(StageCost(s.name, s.wave, stage_epochs(s, train_samples),
                               level_work(s.level, spatial_dims, measured) * share * coarse
                               * estimator_work(s, spatial_dims)
                               * (1.0 if shared else world / len(s.ranks)),
                               bool(s.train.time_budget_s), bool(s.config.crop) and share < 1.0,
                               coarse < 1.0))
    waves: dict[int, float] = {}
    for c in costs:
        waves[c.wave] = waves.get(c.wave, 0.0) + c.total if shared else \
            max(waves.get(c.wave, 0.0), c.total)
    return costs, waves


def describe_cost(costs: Sequence[StageCost], waves: Mapping[int, float], world: int,
                  spatial_dims: int, measured: Mapping[int, float], shared: bool = False) -> str:
    given = f"; measured for level(s) {', '.join(map(str, sorted(measured)))}" \
        if measured else ""
    sharing = "all ranks on the same cores, so concurrent stages add up" if shared else \
        "concurrent stages on their own devices"
    windows = ", an epoch on windows their share of a sample" \
        if any(c.windowed for c in costs) else ""
    if any(c.downsampled for c in costs):
        windows += ", a step downsampled by f 1/f^d of a step"
    lines = [f"estimated cost in level-0 epochs on all {world} rank(s) (an epoch at level L is "
             f"1/{2 ** spatial_dims}^L of the work for {spatial_dims}D samples{given}{windows}; "
             f"{sharing}):"]
    for wave in sorted(waves):
        parts = [f"{c.name} {c.epochs:g}{'(max)' if c.capped else ''} x {c.per_epoch:.3g} = "
                 f"{c.total:.2f}" for c in costs if c.wave == wave]
        lines.append(f"    wave {wave}  " + "; ".join(parts) + f"  -> {waves[wave]:.2f}")
    total = sum(waves.values())
    other = "if the ranks share cores, add --shared-cores" if not shared else \
        "if each rank has its own devices, leave out --shared-cores"
    lines.append(f"    total {total:.2f}: a one-stage level-0 plan of N epochs costs N "
                 f"({other})")
    return "\n".join(lines)


def describe_stages(stages: Sequence[Stage], costs: Sequence[StageCost],
                    train_samples: int) -> str:
    """One row per stage, as it will train: its level, ranks, global batch and peak
    learning rate after the per-level rules (with the factor they applied), steps per
    epoch on `train_samples`, length and estimated cost in level-0 epochs."""
    head = ["stage", "level", "ranks", "global batch", "lr", "steps/epoch", "epochs",
            "cost"]
    rows = [head]
    for s, c in zip(stages, costs, strict=True):
        t, scale = s.train, s.scale
        batch, lr = str(t.global_batch), f"{t.lr:.3g}"
        if scale is not None and scale.batch_factor != 1:
            batch += f" (x{scale.batch_factor:g}{', capped' if scale.capped else ''})"
        if scale is not None and scale.lr_factor != 1:
            lr += f" ({t.lr_scale} x{scale.lr_factor:.3g}" + (
                f", warm-up {t.lr_scale_warmup_steps} steps)" if t.lr_scale_warmup_steps
                else ")")
        ranks = f"{s.ranks[0]}-{s.ranks[-1]}" if len(s.ranks) > 1 else str(s.ranks[0])
        rows.append([s.name, str(s.level), ranks, batch, lr,
                     str(train_samples // t.global_batch), f"{c.epochs:g}",
                     f"{c.total:.2f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("    " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True))
                     .rstrip() for r in rows)
