"""The stage plan: which stage runs on which ranks, and which stages run at the same time.

A stage starts once the stages it depends on (`fuse_from` and `after`) are done. Stages
with no dependency path between them run concurrently, so their rank groups must not
overlap. The plan runs in waves: wave w holds the stages whose longest dependency chain
has length w; the stages of a wave run at the same time on disjoint ranks, and every
rank waits at the end of a wave until the wave is complete.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import TYPE_CHECKING

from hpc_multires.errors import ConfigError
from hpc_multires.train.config import TrainConfig
from hpc_multires.train.scaling import LevelScale, data_factor, level_scale, scaled_train

if TYPE_CHECKING:
    from hpc_multires.plan.config import Config, StageConfig


@dataclass(frozen=True)
class Stage:
    """A stage with its ranks resolved for a world size."""

    name: str
    level: int
    group: str
    ranks: tuple[int, ...]
    wave: int
    config: StageConfig
    phase: str = ""
    """Domain decomposition: "local", "aggregator" or "coherent" ("": an ordinary stage)."""
    subdomain: int = -1
    """The sub-domain of a local or coherent stage."""
    scale: LevelScale | None = None
    """What the per-level rules made of its batch and rate (`apply_level_rules`; None
    before the data's shape is known): `config.train` then holds the scaled values."""

    @property
    def train(self) -> TrainConfig:
        return self.config.train

    @property
    def lr_factor(self) -> float:
        return self.scale.lr_factor if self.scale is not None else 1.0

    @property
    def local_batch(self) -> int:
        return self.train.global_batch // len(self.ranks)


def _bound(text: str, world: int, spec: str, name: str) -> int:
    text = text.strip()
    if text == "end":
        return world
    fraction = "/" in text or "." in text
    try:
        value = Fraction(text) if fraction else Fraction(int(text))
    except (ValueError, ZeroDivisionError):
        value = None
    if value is not None and value < 0:  # range() would take it; Python's -1 is not a rank
        raise ConfigError(f"groups.{name} = {spec!r}: {text!r} is negative; ranks count from 0: "
                          "write START:END such as \"0:2\" for ranks 0 and 1")
    if value is None or (fraction and value > 1):
        raise ConfigError(
            f"groups.{name} = {spec!r}: {text!r} is neither a rank count (2), a fraction of "
            "the world (1/2 or 0.5) nor 'end'; write START:END such as \"0:1/2\"")
    return int(value * world) if fraction else int(value)  # floor: 1/2 of 5 ranks is 2


def group_ranks(name: str, spec: str, world: int) -> tuple[int, ...]:
    """Ranks of a group spec "START:END" in a world of `world` ranks."""
    start, sep, end = spec.partition(":")
    if not sep:
        raise ConfigError(f"groups.{name} = {spec!r}: write START:END, e.g. \"0:1/2\" for the "
                          "first half of the ranks or \"2:4\" for ranks 2 and 3")
    lo, hi = _bound(start, world, spec, name), _bound(end, world, spec, name)
    if hi > world:
        raise ConfigError(f"groups.{name} = {spec!r} needs ranks up to {hi - 1}, but the job "
                          f"has {world} ranks; shrink the group or launch more ranks")
    if hi <= lo:
        raise ConfigError(f"groups.{name} = {spec!r} holds no rank on {world} ranks; "
                          "give it at least one (START < END)")
    return tuple(range(lo, hi))


def dependencies(stage: StageConfig) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*stage.fuse_from, *stage.after)))


def check_plan(cfg: Config) -> None:
    """Checks that need no world size: names, references, fusion settings."""
    seen: list[str] = []
    for i, st in enumerate(cfg.stages):
        where = f"stages[{i}]"
        if not st.name:
            raise ConfigError(f"{where}.name is empty; give every stage a unique name")
        if st.name in seen:
            raise ConfigError(f"{where}.name = {st.name!r} is used twice; stage names are unique")
        if st.level < 0:
            raise ConfigError(f"{where}.level = {st.level}: use 0 or a pyramid level >= 1")
        if st.group != "all" and st.group not in cfg.groups:
            raise ConfigError(f"stage {st.name!r}: group {st.group!r} is not defined; add it "
                              f"under [groups] (e.g. {st.group} = \"0:1/2\") or use \"all\"")
        for dep in dependencies(st):
            if dep not in seen:
                later = dep in (s.name for s in cfg.stages)
                raise ConfigError(
                    f"stage {st.name!r} depends on {dep!r}, which "
                    + ("comes later in the plan; move it before" if later else
                       f"does not exist (stages so far: {seen or 'none'}); fix the name"))
        if st.init == "fuse" and not st.fuse_from:
            raise ConfigError(f"stage {st.name!r}: init = \"fuse\" needs fuse_from = [...] "
                              "naming the earlier stages to fuse")
        if st.init == "fresh" and st.fuse_from:
            raise ConfigError(f"stage {st.name!r}: fuse_from is set but init = \"fresh\"; set "
                              "init = \"fuse\" or use after = [...] for ordering only")
        if st.init == "fuse":
            n = len(st.fuse_from)
            if st.fusion in ("transfer", "prolong") and n != 1:
                raise ConfigError(f"stage {st.name!r}: fusion {st.fusion!r} takes one stage in "
                                  f"fuse_from, got {n}")
            source = next(o for o in cfg.stages if o.name == st.fuse_from[0])
            if st.fusion == "prolong" and source.level < st.level:  # 2^(level gap) < 1
                raise ConfigError(f"stage {st.name!r}: fusion 'prolong' moves a model to a finer "
                                  f"level, but {source.name!r} is on level {source.level} and "
                                  f"this stage on level {st.level}; use fusion = \"transfer\"")
            if st.fusion == "bottom-top" and (n != 2 or st.bottom_layers < 1):
                raise ConfigError(f"stage {st.name!r}: fusion 'bottom-top' takes two stages "
                                  "(bottom, top) and bottom_layers >= 1")
            if st.fusion_weights and len(st.fusion_weights) != n:
                raise ConfigError(f"stage {st.name!r}: {len(st.fusion_weights)} fusion_weights "
                                  f"for {n} stages in fuse_from")
            weights = st.fusion_weights
            if weights and not (all(math.isfinite(w) and w >= 0 for w in weights)
                                and sum(weights) > 0):
                raise ConfigError(f"stage {st.name!r}: fusion_weights = {list(weights)}; use "
                                  "one finite weight >= 0 per stage in fuse_from, not all 0 "
                                  "(e.g. [1, 1])")
        if st.carry_optimizer:
            giver = next((o for o in cfg.stages if st.fuse_from and o.name == st.fuse_from[0]),
                         None)
            if st.init != "fuse" or len(st.fuse_from) != 1 or giver is None:
                raise ConfigError(f"stage {st.name!r}: carry_optimizer takes the optimizer of "
                                  "the one stage it is fused from; set init = \"fuse\" and "
                                  "fuse_from = [one stage]")
            if giver.train.optimizer != st.train.optimizer:
                raise ConfigError(f"stage {st.name!r}: carry_optimizer with train.optimizer = "
                                  f"{st.train.optimizer!r}, but {giver.name!r} trains with "
                                  f"{giver.train.optimizer!r}; use the same optimizer")
        if st.crop < 0:
            raise ConfigError(f"stage {st.name!r}: crop = {st.crop}; use a window size in "
                              "points per axis (e.g. 16), or 0 for whole samples")
        if st.crop and cfg.model.head != "gap" and not cfg.model.image_to_image:
            raise ConfigError(f"stage {st.name!r}: crop = {st.crop} trains on windows "
                              "smaller than the samples, which the flatten head's dense "
                              "layer cannot take; set model.head = \"gap\" (one network "
                              "for every input size)")
        if not 0.0 <= st.fusion_keep <= 1.0:
            raise ConfigError(f"stage {st.name!r}: fusion_keep = {st.fusion_keep}; use a value "
                              "between 0 (a fresh start) and 1 (the fused model as it is)")
        seen.append(st.name)
    for name, spec in cfg.groups.items():
        group_ranks(name, spec, 1 << 20)  # syntax only; sizes are checked per world
    for st in cfg.plan():
        _check_stage_task(cfg, st)


def _check_stage_task(cfg: Config, st: StageConfig) -> None:
    """What the task and the model allow a stage: windows, the MGE estimator."""
    where = f"stage {st.name!r}: " if cfg.stages else ""
    key = f"stages.{st.name}.train" if cfg.stages else "train"
    if st.crop and cfg.task.restoration:
        raise ConfigError(f"{where}crop = {st.crop} with task.kind = {cfg.task.kind!r}: an "
                          "image task corrupts whole images (its draws are laid out on the "
                          "whole image); leave crop at 0")
    t = st.train
    if t.estimator == "mge" and st.crop:
        raise ConfigError(f"{where}crop = {st.crop} with {key}.estimator = \"mge\": the "
                          "estimator's levels take whole samples; leave crop at 0")
    if t.estimator == "mge" and not cfg.model.image_to_image and cfg.model.head != "gap":
        raise ConfigError(f"{where}{key}.estimator = \"mge\" runs the model on {t.mge_levels} "
                          "levels with one set of weights, which the flatten head's dense "
                          "layer cannot take; set model.head = \"gap\"")
    if t.estimator == "mge" and cfg.task.restoration and cfg.task.coarse_corruption != "restricted":
        raise ConfigError(f"{where}{key}.estimator = \"mge\" with task.coarse_corruption = "
                          f"{cfg.task.coarse_corruption!r}: its corrections restrict the fine "
                          "corrupted images, so its coarse terms must be the restricted "
                          "corruption for the estimate to be unbiased; set "
                          "task.coarse_corruption = \"restricted\"")
    if t.restriction == "bilinear" and t.estimator == "mge" and not cfg.model.image_to_image:
        raise ConfigError(f"{where}{key}.restriction = \"bilinear\" is for 2D images; use "
                          "\"avg\" or \"nearest\"")


def domain_stages(cfg: Config, world: int) -> list[Stage]:
    """The plan of domain decomposition on `world` ranks: wave 0, a local CNN per
    sub-domain (`local-D`, on its ranks of the process grid, all at the same time); wave 1,
    the aggregator on the gathered outputs (all ranks); wave 2, the coherent CNN-DNN, one
    stage per sub-domain (`coherent-D`, each checkpointing its part) trained as one model."""
    from dataclasses import replace

    from hpc_multires.methods.domain import process_grid
    from hpc_multires.plan.config import StageConfig

    dom, t = cfg.domain, cfg.train
    grid = process_grid(world, dom.grid)
    local = replace(t, epochs=dom.local_epochs or t.epochs)
    aggregator = replace(t, epochs=dom.aggregator_epochs, lr=dom.aggregator_lr,
                         global_batch=dom.aggregator_batch or t.global_batch,
                         optimizer="adam", warmup_epochs=0, steps=0)
    coherent = replace(t, epochs=dom.coherent_epochs, lr=dom.coherent_lr or t.lr / 10,
                       warmup_epochs=0, steps=0)
    stages: list[Stage] = []
    for d in range(grid.subdomains):
        name = f"local-{d}"
        stages.append(Stage(name, cfg.data.level, f"sub{d}", grid.subdomain_ranks(d), 0,
                            StageConfig(name=name, level=cfg.data.level, train=local),
                            "local", d))
    everyone = tuple(range(world))
    stages.append(Stage("aggregator", cfg.data.level, "all", everyone, 1,
                        StageConfig(name="aggregator", level=cfg.data.level,
                                    after=tuple(s.name for s in stages), train=aggregator),
                        "aggregator"))
    if dom.coherent_epochs:
        for d in range(grid.subdomains):
            name = f"coherent-{d}"
            stages.append(Stage(name, cfg.data.level, f"sub{d}", grid.subdomain_ranks(d), 2,
                                StageConfig(name=name, level=cfg.data.level,
                                            after=("aggregator",), train=coherent),
                                "coherent", d))
    for s in stages:
        if s.phase != "aggregator" and s.train.global_batch % grid.replicas:
            b, n = s.train.global_batch, grid.replicas
            raise ConfigError(
                f"train.global_batch = {b} is not divisible by the {n} replicas of each "
                f"sub-domain ({world} ranks / {grid.subdomains} sub-domains); set it to a "
                f"multiple of {n} (e.g. --set train.global_batch={max(b // n, 1) * n})")
    return stages


def resolve(cfg: Config, world: int) -> list[Stage]:
    """The plan's stages with ranks and waves for `world` ranks; raises on a bad plan."""
    if cfg.domain.on:
        return domain_stages(cfg, world)
    stages: list[Stage] = []
    by_name: dict[str, Stage] = {}
    for st in cfg.plan():
        ranks = tuple(range(world)) if st.group == "all" else group_ranks(
            st.group, cfg.groups[st.group], world)
        wave = 1 + max((by_name[d].wave for d in dependencies(st)), default=-1)
        stage = Stage(st.name, st.level, st.group, ranks, wave, st)
        if st.train.global_batch % len(ranks):
            n, b = len(ranks), st.train.global_batch
            key = f"stage {st.name!r}: train.global_batch" if cfg.stages else "train.global_batch"
            fits = sorted({max(b // n * n, n), b // n * n + n})
            raise ConfigError(
                f"{key} = {b} is not divisible by the {n} ranks that run it; set it to a "
                f"multiple of {n} (e.g. --set train.global_batch="
                f"{' or '.join(map(str, fits))}) or change the number of ranks")
        stages.append(stage)
        by_name[st.name] = stage
    _check_overlaps(stages, by_name)
    return stages


def apply_level_rules(cfg: Config, stages: list[Stage],
                      spatial_at: Callable[[int], tuple[int, ...]],
                      train_samples: int) -> list[Stage]:
    """The stages with their per-level batch and rate rules applied (train.batch_scale,
    batch_cap, lr_scale; `train/scaling.py`), for samples whose spatial size at level k is
    `spatial_at(k)` and a training set of `train_samples`; raises when a scaled batch does
    not fit the stage's ranks or its training set."""
    level0 = math.prod(spatial_at(0))
    out = []
    for s in stages:
        t = s.train
        shape = spatial_at(s.level)
        points = math.prod(min(s.config.crop, n) for n in shape) if s.config.crop \
            else math.prod(shape)
        factor = data_factor(level0, points)
        scale = level_scale(t, factor)
        key = f"stages.{s.name}.train" if cfg.stages else "train"
        where = f"stage {s.name!r}: " if cfg.stages else ""
        n = len(s.ranks)
        # Only a binding cap can do this (an unscaled batch is checked where it is used: the
        # aggregator of domain decomposition, for one, splits its batch its own way).
        if scale.batch_factor != 1 and scale.batch % n:
            fits = sorted({max(scale.batch // n * n, n), scale.batch // n * n + n})
            raise ConfigError(
                f"{where}{key}.batch_cap = {t.batch_cap} caps the scaled batch at level "
                f"{s.level} ({t.global_batch} x {factor}) at a number its {n} ranks do not "
                f"divide; set batch_cap to a multiple of {n} (e.g. "
                f"{' or '.join(map(str, fits))})")
        if scale.batch_factor != 1 and scale.batch > train_samples:
            most = max(train_samples // n * n, t.global_batch)
            raise ConfigError(
                f"{where}{key}.batch_scale = \"data\" gives a global batch of {scale.batch} at "
                f"level {s.level} ({t.global_batch} x {factor}), more than the "
                f"{train_samples} training samples; set {key}.batch_cap to at most {most} "
                f"(a multiple of the stage's {n} ranks), e.g. --set {key}.batch_cap={most}")
        out.append(replace(s, config=replace(s.config, train=scaled_train(t, scale)),
                           scale=scale))
    return out


def _ancestors(stage: Stage, by_name: dict[str, Stage]) -> set[str]:
    out: set[str] = set()
    todo = list(dependencies(stage.config))
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo += dependencies(by_name[name].config)
    return out


def _check_overlaps(stages: list[Stage], by_name: dict[str, Stage]) -> None:
    for i, a in enumerate(stages):
        for b in stages[i + 1:]:
            shared = sorted(set(a.ranks) & set(b.ranks))
            if shared and a.name not in _ancestors(b, by_name):
                raise ConfigError(
                    f"stages {a.name!r} and {b.name!r} both use ranks {shared[:8]} and neither "
                    "depends on the other, so they would run at the same time on the same "
                    f"ranks; give them disjoint groups, or add after = [{a.name!r}] to "
                    f"{b.name!r}")


def describe_plan(stages: list[Stage]) -> str:
    rows = []
    for s in stages:
        start = "fresh" if s.config.init == "fresh" else \
            f"{s.config.fusion}({', '.join(s.config.fuse_from)})"
        n = s.train.epochs
        count = f"{s.train.steps} steps" if s.train.steps else \
            f"{n} epoch{'' if n == 1 else 's'}"
        length = count + (
            f" or {s.train.time_budget_s:g} s" if s.train.time_budget_s else "")
        if s.train.schedule_epochs:  # a stage on part of a longer learning-rate schedule
            first = s.train.schedule_offset
            # A stage sized in steps covers steps / (its steps per epoch) epochs of the
            # schedule, which depends on the data: only where it starts is known here.
            span = f"from epoch {first + 1:g}" if s.train.steps else \
                f"epochs {first + 1:g}-{first + n:g}"
            length += f" (lr schedule {span} of {s.train.schedule_epochs:g})"
        if s.train.estimator == "mge":
            t = s.train
            length += (f", mge over {t.mge_levels} levels (batch x{t.mge_growth:g} per level, "
                       f"{t.restriction})")
        ranks = f"{s.ranks[0]}-{s.ranks[-1]}" if len(s.ranks) > 1 else str(s.ranks[0])
        where = f"level {s.level}" + (f" windows {s.config.crop}" if s.config.crop else "")
        down = s.train.downsample
        if down.on:  # dynamic downsampling: a share of the steps on coarser inputs
            where += f" ({down.fraction:g} of steps /{down.factor}, {down.schedule})"
        batch = f"batch {s.train.global_batch}"
        if s.scale is not None and s.scale.scaled:  # the per-level rules changed them
            batch += f" (x{s.scale.batch_factor:g}) lr {s.train.lr:.3g}"
        rows.append(f"    wave {s.wave}  {s.name:<12} {where}  ranks {ranks:<7} "
                    f"({s.group}) {batch} {length}, {start}")
    return "\n".join(rows)
