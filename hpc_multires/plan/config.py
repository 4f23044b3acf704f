"""The config tree: one frozen dataclass per component, each field documented.

A TOML file maps onto `Config` section by section. Unknown keys, wrong types and bad
values raise `ConfigError` naming the key and the fix; checks that need the world size
happen in `plan.stages.resolve`, those that need the dataset and the built models in
`driver.run.open_levels` (both run by `hpc-multires plan` as by `train`).
"""

from __future__ import annotations

import difflib
import itertools
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from hpc_multires.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What the run is called and how it is seeded."""

    name: str = "run"
    """Run name; the default run directory is runs/<name>."""
    seed: int = 0
    """Seeds model initialisation and the per-epoch data order (same on every rank count);
    0 or more."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the samples come from and how they are read."""

    path: str = ""
    """Dataset directory (shard-*.h5 files). Required; `--set data.path=DIR` overrides it."""
    val_path: str = ""
    """Separate validation dataset; empty: hold out `val_fraction` of `path`."""
    val_fraction: float = 0.2
    """Fraction of `path` (its last samples) used for validation when `val_path` is empty."""
    level: int = 0
    """Pyramid level to train on: 0 = original, k = downsampled by 2^k per spatial axis.
    Only for a config without [[stages]]; a non-zero value beside them is an error (each
    stage sets its own `level`)."""
    num_workers: int = 1
    """Background reader processes per rank; 0 reads in the training process."""
    prefetch: int = 4
    """Batches each reader process keeps ready ahead of the training step."""
    read_timeout_s: float = 120.0
    """With num_workers > 0: a rank waiting longer than this for its next batch (a read
    stuck on a file system that stopped answering) ends the job with a message saying so,
    instead of holding every rank until the job's time limit; 0 waits forever."""
    stage_to: str = ""
    """Node-local directory (e.g. "$TMPDIR") to copy the shards to before training, once
    per node, checksums verified, removed at the end; empty: read in place."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The network. Input channels, sample shape and outputs come from the dataset."""

    name: Literal["cosmoflow", "neuron_inverter"] = "cosmoflow"
    """Architecture: cosmoflow (3D samples) or neuron_inverter (1D traces)."""
    width: float = 1.0
    """Width multiplier. cosmoflow: the first conv block has round(32 * width) filters,
    doubling per block; neuron_inverter: each block has round(conv_channels[i] * width)."""
    depth: int = 5
    """cosmoflow: conv blocks, each halving every axis (with the flatten head the input side
    must be >= 2^depth; the gap head takes any size)."""
    kernel_size: int = 3
    """Convolution kernel size (odd for cosmoflow; the shipped Neuron configs use 4, the
    reference network's)."""
    conv_channels: tuple[int, ...] = (30, 90, 180)
    """neuron_inverter: filters of its conv blocks (scaled by width)."""
    pool: int = 4
    """neuron_inverter: pooling factor of each conv block (cosmoflow pools by 2)."""
    pool_type: Literal["max", "avg"] = "max"
    """Pooling of the conv blocks: max (the reference networks) or avg. Average pooling
    is linear, so with kernel_level a model moved between levels keeps what it computed
    far more closely (docs/design.md, "Moving between levels")."""
    norm: Literal["none", "batch"] = "none"
    """Normalisation after each convolution: none (the reference networks) or batch
    (BatchNorm: per batch and channel, so what sets one sample apart from the others, its
    amplitude included, survives; a per-sample norm would erase it)."""
    head: Literal["flatten", "gap"] = "flatten"
    """flatten: dense layers on the flattened features (original); gap: global average pool."""
    fc_sizes: tuple[int, ...] = (128, 64)
    """Hidden dense layer sizes."""
    dropout: float = 0.0
    """Dropout probability before each hidden dense layer."""
    coarse_pools: Literal["keep", "drop"] = "keep"
    """How the network runs on a coarse level L. keep: unchanged, so every layer sees
    features 2^L times smaller than at level 0 (cheapest, but weights moved to level 0
    then measure the wrong scales); drop: the first poolings are reduced by 2^L in all, so
    every later layer sees the same scale and map size as at level 0 and weights carry
    over between levels unchanged (see docs/design.md, "Moving between levels")."""
    stem_level: int = 0
    """Mesh-free first convolution (0: off). Its kernel is defined on the grid of pyramid
    level R = stem_level: on a finer level L it is sampled at that level's spacing (2^(R-L)
    times the taps per axis) and applied with stride 2^(R-L), so the first block's output
    lies on the level-R grid whatever the input level, and `prolong` moves a level-R model
    to level L without changing what it computes. The first block(s) pool 2^R less, which
    keeps the later map sizes of the plain network. Levels coarser than R run the stem
    unstrided. Train the baseline with the same setting to compare like with like."""
    stem_detail: bool = False
    """With stem_level: on levels finer than stem_level, add a full-resolution branch beside
    the strided stem (a convolution at the level's own spacing, max-pooled onto the stem's
    grid) whose per-channel gate starts at 0. A model prolonged from a coarse level starts
    out computing what the coarse model did and learns from there what only the fine level
    shows."""
    kernel_level: int = 0
    """Level-consistent network (0: off). Kernels and pooling windows are given on the
    grid of pyramid level R = kernel_level. On a finer level L, with f = 2^(R-L), the
    first convolution has f times the taps per axis, the later ones are dilated by f, and
    each pooling window spans f * (pool - 1) + 1 points at the unchanged stride: every map
    keeps its level's size (a level costs what its samples hold), and a level-R model moved
    to level L by `prolong` computes at every f-th map point what it computed on level R,
    up to the points in between that the wider pooling windows also read. Levels R and
    coarser run the plain network. Train the baseline with the same setting to compare
    like with like."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The optimisation: global batch, optimizer, schedule, epochs."""

    epochs: int = 4
    """Number of passes over the training set."""
    global_batch: int = 16
    """Samples per optimizer step over the stage's ranks; each reads global_batch / ranks.
    At most the training set's size (checked before training, and by `plan`)."""
    optimizer: Literal["sgd", "adam"] = "adam"
    """sgd (with momentum) or adam (AdamW)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warm-up."""
    momentum: float = 0.9
    """SGD momentum (ignored by adam)."""
    weight_decay: float = 0.0
    """Weight decay: decoupled for adam (AdamW), L2 added to the gradient for sgd."""
    warmup_epochs: float = 0.0
    """Linear warm-up from lr/10 to lr over this many epochs."""
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """Decay after warm-up, down to lr * min_lr_ratio at the last step."""
    min_lr_ratio: float = 0.01
    """Final learning rate as a fraction of lr."""
    schedule_epochs: float = 0.0
    """Lay the warm-up and decay over this many epochs instead of the stage's own (0: the
    stage's epochs). With schedule_offset, consecutive stages can share one curve: a
    coarse stage with epochs = 10, schedule_epochs = 13 and the fine stage after it with
    epochs = 3, schedule_epochs = 13, schedule_offset = 10 follow one 13-epoch schedule,
    so the fine stage goes on at the rate the coarse one stopped at, with no second
    warm-up."""
    schedule_offset: float = 0.0
    """Epochs of the schedule already run by earlier stages (with schedule_epochs)."""
    checkpoint_keep: int = 3
    """Checkpoints kept per stage, the newest, counting epoch-end and mid-epoch ones alike
    (older ones are deleted)."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every this many steps inside an epoch (0: at epoch ends only)."""
    time_budget_s: float = 0.0
    """Stop the stage after this many seconds of training (0: run all epochs). A stage that
    reaches it is done: --resume skips it rather than training on."""


@dataclass(frozen=True, kw_only=True)
class CommConfig:
    """How ranks talk."""

    backend: Literal["ddp", "horovod"] = "ddp"
    """Gradient allreduce: ddp (torch.distributed DDP: gloo on CPU, NCCL on GPU) or horovod
    (hvd.DistributedOptimizer; one Horovod process set per stage group; `make horovod`)."""
    compression: Literal["none", "fp16"] = "none"
    """horovod: compress gradients to fp16 for the allreduce (none: full precision)."""
    timeout_s: float = 300.0
    """A collective waiting longer than this fails the job instead of hanging it."""


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    """What is written to RUN_DIR/metrics.jsonl and the console."""

    every_steps: int = 10
    """Log the global mean loss every this many steps (an allreduce each time)."""
    progress_s: float = 30.0
    """Seconds between plain progress lines when stderr is not a terminal (batch logs)."""


FUSIONS = ("transfer", "prolong", "average", "bottom-top")


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """One stage of the plan: a pyramid level, a group of ranks, a length, a start.

    Its `train` table overrides the run's [train] key by key; the resolved config holds
    each stage's complete training settings.
    """

    name: str = ""
    """Unique stage name; used in metrics, checkpoints (RUN_DIR/stages/<name>) and fusion."""
    level: int = 0
    """Pyramid level the stage trains on (0 = original data)."""
    group: str = "all"
    """Ranks that run the stage: "all", or a key of [groups]."""
    init: Literal["fresh", "fuse"] = "fresh"
    """fresh: new weights from run.seed; fuse: built from the final models of `fuse_from`."""
    fuse_from: tuple[str, ...] = ()
    """Earlier stages whose final models the fusion operator combines (first = primary)."""
    fusion: Literal["transfer", "prolong", "average", "bottom-top"] = "transfer"
    """transfer: copy layers whose name and shape match; prolong: transfer, and upsample the
    dense layer after the flatten to this stage's resolution (from a stage on a coarser or
    the same level; from a finer one it is an error); average: weighted mean of models of
    one architecture; bottom-top: first `bottom_layers` layers from the first model, the
    rest from the second."""
    fusion_weights: tuple[float, ...] = ()
    """Weights for `average`, one per fuse_from stage (empty: equal): finite, >= 0, not all
    0."""
    bottom_layers: int = 0
    """For bottom-top: how many parameterised layers come from the first model, counted over
    the layers it shares with this stage's model (the stem_detail branch left out); more
    than it has is an error before any stage trains."""
    fusion_keep: float = 1.0
    """Shrink the fused weights towards a fresh initialisation: keep * fused + (1 - keep) *
    fresh for every float entry (1: the fused model as it is)."""
    after: tuple[str, ...] = ()
    """Stages that must finish first, besides those in fuse_from."""
    crop: int = 0
    """Train on sub-volumes: each step takes from every sample a random window of `crop`
    points along each spatial (or time) axis of the stage's level, at a new place every
    step; validation averages the predictions over the disjoint windows that tile each
    sample. 0: whole samples. Needs a model that takes any input size (model.head = "gap")."""
    train: TrainConfig = TrainConfig()
    """This stage's optimisation; unset keys come from the run's [train]."""


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run."""

    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    comm: CommConfig = CommConfig()
    log: LogConfig = LogConfig()
    groups: dict[str, str] = field(default_factory=dict)
    """Named rank groups, "START:END" of the world: "0:1/2", "1/2:end", "0:2" (counts)."""
    stages: tuple[StageConfig, ...] = ()
    """The stage plan, in order. Empty: one stage at data.level on all ranks with [train]."""

    def __post_init__(self) -> None:
        _check_values(self)
        from hpc_multires.plan.stages import check_plan

        check_plan(self)

    def plan(self) -> tuple[StageConfig, ...]:
        """The stages to run; the implicit one-stage plan when none are given."""
        if self.stages:
            return self.stages
        return (StageConfig(name="main", level=self.data.level, train=self.train),)


def _need(ok: bool, key: str, value: object, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {fix}")


def _check_train(t: TrainConfig, prefix: str) -> None:
    need = _need
    need(t.epochs >= 1, f"{prefix}.epochs", t.epochs, "use 1 or more")
    need(t.global_batch >= 1, f"{prefix}.global_batch", t.global_batch, "use 1 or more")
    need(t.lr > 0, f"{prefix}.lr", t.lr, "use a positive learning rate")
    need(0.0 <= t.momentum < 1.0, f"{prefix}.momentum", t.momentum, "use a value in [0, 1)")
    need(t.weight_decay >= 0, f"{prefix}.weight_decay", t.weight_decay, "use 0 or more")
    span = t.schedule_epochs or t.epochs
    need(0 <= t.warmup_epochs <= span, f"{prefix}.warmup_epochs", t.warmup_epochs,
         f"use a value between 0 and {span} (the epochs its schedule spans)")
    need(t.schedule_epochs >= 0, f"{prefix}.schedule_epochs", t.schedule_epochs,
         "use 0 (the stage's own epochs) or the epochs of the shared schedule")
    need(t.schedule_offset >= 0 and (t.schedule_epochs > 0 or t.schedule_offset == 0),
         f"{prefix}.schedule_offset", t.schedule_offset,
         f"use 0, or set {prefix}.schedule_epochs to the schedule this offset is into")
    need(t.schedule_epochs == 0 or t.schedule_offset + t.epochs <= t.schedule_epochs + 1e-9,
         f"{prefix}.schedule_epochs", t.schedule_epochs,
         f"use at least schedule_offset + epochs = {t.schedule_offset + t.epochs}")
    need(0 < t.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", t.min_lr_ratio,
         "use a value in (0, 1]")
    need(t.checkpoint_keep >= 1, f"{prefix}.checkpoint_keep", t.checkpoint_keep,
         "keep at least 1")
    need(t.checkpoint_every_steps >= 0, f"{prefix}.checkpoint_every_steps",
         t.checkpoint_every_steps, "use 0 (epoch ends only) or a number of steps")
    need(t.time_budget_s >= 0, f"{prefix}.time_budget_s", t.time_budget_s,
         "use 0 (no budget) or a positive number of seconds")


def _check_values(cfg: Config) -> None:
    need = _need
    d, m, c, g = cfg.data, cfg.model, cfg.comm, cfg.log
    need(cfg.run.seed >= 0, "run.seed", cfg.run.seed,
         "use 0 or a positive integer (numpy's seeds are non-negative)")
    need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction,
         "use a fraction in [0, 1)")
    need(d.level >= 0, "data.level", d.level, "use 0 (original) or a pyramid level k >= 1")
    need(d.level == 0 or not cfg.stages, "data.level", d.level,
         "a config with [[stages]] takes each stage's own level; set it there (level = k, "
         "or --set stages.NAME.level=k) and leave data.level out")
    need(d.num_workers >= 0, "data.num_workers", d.num_workers, "use 0 or more")
    need(d.prefetch >= 1, "data.prefetch", d.prefetch, "use 1 or more")
    need(math.isfinite(d.read_timeout_s) and d.read_timeout_s >= 0, "data.read_timeout_s",
         d.read_timeout_s, "use 0 (wait forever) or a positive number of seconds")
    need(m.width > 0, "model.width", m.width, "use a positive multiplier such as 0.25 or 1")
    need(m.depth >= 1, "model.depth", m.depth, "use 1 or more conv blocks")
    need(m.kernel_size >= 1, "model.kernel_size", m.kernel_size, "use a size such as 3")
    need(m.pool >= 1, "model.pool", m.pool, "use a pooling factor such as 4")
    need(len(m.conv_channels) >= 1 and all(c >= 1 for c in m.conv_channels),
         "model.conv_channels", m.conv_channels, "use positive filter counts, e.g. [30, 90, 180]")
    need(all(s >= 1 for s in m.fc_sizes), "model.fc_sizes", m.fc_sizes,
         "use positive layer sizes, e.g. [128, 64]")
    need(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "use a probability in [0, 1)")
    need(0 <= m.stem_level <= 4, "model.stem_level", m.stem_level,
         "use 0 (off) or the pyramid level the first convolution is defined on, e.g. 1")
    need(m.stem_level > 0 or not m.stem_detail, "model.stem_detail", m.stem_detail,
         "set model.stem_level (the branch sits beside a strided stem) or leave it false")
    need(m.stem_level == 0 or m.coarse_pools == "keep", "model.stem_level", m.stem_level,
         "use either model.stem_level or model.coarse_pools = 'drop', not both: each sets "
         "how the first blocks pool")
    need(0 <= m.kernel_level <= 4, "model.kernel_level", m.kernel_level,
         "use 0 (off) or the pyramid level the kernels are defined on, e.g. 1")
    need(m.kernel_level == 0 or (m.stem_level == 0 and m.coarse_pools == "keep"),
         "model.kernel_level", m.kernel_level,
         "use model.kernel_level alone: model.stem_level and model.coarse_pools = 'drop' "
         "change the same layers in another way")
    _check_train(cfg.train, "train")
    for stage in cfg.stages:
        _check_train(stage.train, f"stages.{stage.name}.train")
    need(c.timeout_s > 0, "comm.timeout_s", c.timeout_s, "use a positive number of seconds")
    need(g.every_steps >= 1, "log.every_steps", g.every_steps, "use 1 or more")
    need(g.progress_s > 0, "log.progress_s", g.progress_s, "use a positive number of seconds")


# ---------------------------------------------------------------- TOML -> dataclasses

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """`value` as type `tp`, or a ConfigError naming `key` and what it expects."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key} = {value!r} is not one of {_type_name(tp)}{hint}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            example = '["coarse1", "coarse2"]' if key.endswith("fuse_from") else "[128, 64]"
            raise ConfigError(f"{key} = {value!r}: expected a list, e.g. {example}")
        (inner, *_) = typing.get_args(tp)
        if is_dataclass(inner):
            return tuple(_build(inner, v, f"{key}[{i}]")  # type: ignore[arg-type]
                         for i, v in enumerate(value))
        return tuple(_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table, got {value!r}")
        _, inner = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", inner, v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union type for {key}")  # config fields are never unions
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string (quote it in TOML)")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{prefix}] must be a table of keys, got {table!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close \
                else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        tp = hints[key]
        if is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(full, tp, value)
    return cls(**kwargs)


def config_from_dict(table: dict[str, Any]) -> Config:
    stages = table.get("stages")
    if isinstance(stages, list):
        # Each stage's [stages.train] overrides the run's [train] key by key.
        base = table.get("train", {})
        table = {**table, "stages": [
            {**st, "train": {**base, **st.get("train", {})}} if isinstance(st, dict) else st
            for st in stages]}
    return typing.cast(Config, _build(Config, table, ""))


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML config, apply `--set` overrides (section.key=value, or for one stage
    stages.NAME.key=value and stages.NAME.train.key=value), validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; pass the path of a TOML config "
                          "such as configs/cosmoflow-demo.toml")
    try:
        table = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e}); fix the syntax at that line") from None
    for item in overrides or []:
        _set(table, item)
    return config_from_dict(table)


def _set(table: dict[str, Any], item: str, resolved: bool = False) -> None:
    """Apply one `--set KEY=VALUE` to a TOML table. KEY is section.key, stages.NAME.key or
    stages.NAME.train.key. `resolved`: every stage's train table is complete (a table from
    `config_to_dict`), so a stage inherits a run's train key when its value equals the
    run's; otherwise a stage sets a key itself when its [stages.train] holds it."""
    key, eq, raw = item.partition("=")
    key = key.strip()
    if not eq or not key or "." not in key:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. "
                          "--set train.epochs=8 or --set data.path=/scratch/data")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as a path
    *parents, leaf = key.split(".")
    node = table
    if parents[0] == "stages":
        node, parents, leaf = _stage_table(table, item, key)
    elif parents == ["train"] and isinstance(table.get("stages"), list) and table["stages"]:
        _set_run_train(table, item, leaf, value, raw.strip(), resolved)
        return
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
    node[leaf] = value


def _stage_table(table: dict[str, Any], item: str,
                 key: str) -> tuple[dict[str, Any], list[str], str]:
    """For KEY = stages.NAME.rest: the stage named NAME, and rest as (parents, leaf)."""
    stages = [st for st in table.get("stages") or [] if isinstance(st, dict)]
    names = [str(st.get("name", "")) for st in stages]
    if not stages:
        raise ConfigError(f"--set {item!r}: the config has no [[stages]]; set the run's own "
                          "keys instead, e.g. --set train.epochs=8")
    rest = key.removeprefix("stages.")
    # The longest name that fits: a stage name may itself hold a dot.
    fits = [i for i, name in enumerate(names) if rest.startswith(name + ".")]
    if not fits and rest in names:
        raise ConfigError(f"--set {item!r}: name a key of stage {rest!r}, e.g. --set "
                          f"stages.{rest}.train.epochs=3 or --set stages.{rest}.level=1")
    if not fits:
        wanted = rest.split(".", 1)[0]
        close = difflib.get_close_matches(wanted, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"--set {item!r}: no stage named {wanted!r} (stages: "
                          f"{', '.join(names)}); {hint}address a stage by its name, e.g. "
                          f"--set stages.{(close or names)[0]}.train.epochs=3")
    i = max(fits, key=lambda j: len(names[j]))
    *parents, leaf = rest[len(names[i]) + 1:].split(".")
    return stages[i], parents, leaf


def _set_run_train(table: dict[str, Any], item: str, leaf: str, value: Any, raw: str,
                   resolved: bool) -> None:
    """`--set train.KEY=VALUE` on a staged config: the run's [train], which each stage
    inherits unless it sets KEY itself; an error when every stage does, since the
    override would then change nothing."""
    base = table.setdefault("train", {})
    if not isinstance(base, dict):
        raise ConfigError(f"--set {item!r}: 'train' is not a section")
    stages = [st for st in table["stages"] if isinstance(st, dict)]
    missing = object()
    old = base.get(leaf, missing)

    def sets_own(stage: dict[str, Any]) -> bool:
        own = stage.get("train")
        if not isinstance(own, dict) or leaf not in own:
            return False
        return not resolved or own[leaf] != old

    shadowed = [sets_own(st) for st in stages]
    if stages and all(shadowed):
        names = [str(st.get("name", "")) for st in stages]
        raise ConfigError(
            f"--set {item!r} changes nothing: every stage sets its own train.{leaf} "
            f"({', '.join(names)}); set it per stage, e.g. --set stages.{names[0]}.train."
            f"{leaf}={raw}")
    base[leaf] = value
    if resolved:  # inheriting stages hold a copy of the old value: update it
        for st, own in zip(stages, shadowed, strict=True):
            if not own and isinstance(st.get("train"), dict) and leaf in st["train"]:
                st["train"][leaf] = value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A new config with `section.key=value` overrides applied and validated. A stage whose
    train value equals the run's counts as inheriting it (the resolved config cannot tell)."""
    table = config_to_dict(cfg)
    for item in overrides:
        _set(table, item, resolved=True)
    return config_from_dict(table)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out[f.name] = config_to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = [config_to_dict(v) if is_dataclass(v) else v for v in value]
        elif isinstance(value, dict):
            out[f.name] = dict(value)
        else:
            out[f.name] = value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_table(header: str, table: dict[str, Any]) -> list[str]:
    lines = [header]
    lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    lines.append("")
    for k, v in table.items():
        if isinstance(v, dict):
            name = header.strip("[]")
            lines += _toml_table(f"[{name}.{k}]", v)
    return lines


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML, every field written out (defaults included)."""
    lines: list[str] = []
    for section, table in config_to_dict(cfg).items():
        if section == "stages":
            for stage in table:
                lines += _toml_table("[[stages]]", stage)
        else:
            lines += _toml_table(f"[{section}]", table)
    return "\n".join(lines)


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (the string literal under the field); the tests check
    that every key has one."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


