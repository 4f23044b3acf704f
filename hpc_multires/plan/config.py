"""The config tree: the run's own settings and its stage plan, composing each
component's config class (`data/config.py`, `models/config.py`, `train/config.py`,
`comm/config.py`), every field documented.

Value checks live with each component (`check()`); the cross-component and plan checks
live here and in `plan.stages.check_plan`. Reading TOML and `--set` is `plan/load.py`;
what a resumed run may change is `plan/compat.py`. Checks that need the world size happen
in `plan.stages.resolve`, those that need the dataset and the built models in
`driver.run.open_levels` (both run by `hpc-multires plan` as by `train`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hpc_multires.comm.config import CommConfig
from hpc_multires.data.config import DataConfig
from hpc_multires.errors import ConfigError, require
from hpc_multires.methods.domain import DomainConfig
from hpc_multires.models.config import ModelConfig
from hpc_multires.train.config import LogConfig, TrainConfig
from hpc_multires.train.task import TaskConfig


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What the run is called and how it is seeded."""

    name: str = "run"
    """Run name; the default run directory is runs/<name>."""
    seed: int = 0
    """Seeds model initialisation and the per-epoch data order (same on every rank count);
    0 or more."""


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
    carry_optimizer: bool = False
    """With init = "fuse" from one stage whose model has every parameter of this one (the
    same network on another level: transfer or prolong of a fully convolutional model):
    start the optimizer from that stage's final state (AdamW's moments, SGD's momentum)
    instead of a fresh one, as one optimizer running through the stages would."""
    after: tuple[str, ...] = ()
    """Stages that must finish first, besides those in fuse_from."""
    crop: int = 0
    """Train on sub-volumes: each step takes from every sample a random window of `crop`
    points along each spatial (or time) axis of the stage's level, at a new place every
    step; validation averages the predictions over the disjoint windows that tile each
    sample. 0: whole samples. Needs a model that takes any input size (model.head = "gap")."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """This stage's optimisation; unset keys come from the run's [train]."""


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    log: LogConfig = field(default_factory=LogConfig)
    domain: DomainConfig = field(default_factory=DomainConfig)
    """Domain decomposition (CNN-DNN): local CNNs on sub-domains, an aggregator, a
    coherent model; its phases are the plan (`plan.stages.domain_stages`)."""
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


def _check_values(cfg: Config) -> None:
    require(cfg.run.seed >= 0, "run.seed", cfg.run.seed,
            "use 0 or a positive integer (numpy's seeds are non-negative)")
    cfg.data.check()
    require(cfg.data.level == 0 or not cfg.stages, "data.level", cfg.data.level,
            "a config with [[stages]] takes each stage's own level; set it there (level = k, "
            "or --set stages.NAME.level=k) and leave data.level out")
    cfg.model.check()
    cfg.task.check()
    _check_task_and_model(cfg)
    cfg.train.check("train")
    for stage in cfg.stages:
        stage.train.check(f"stages.{stage.name}.train")
    trains = [("train", cfg.train)] if not cfg.stages else \
        [(f"stages.{s.name}.train", s.train) for s in cfg.stages]
    for prefix, train in trains:
        _check_downsample_model(prefix, train, cfg.model)
    cfg.comm.check()
    cfg.log.check()
    cfg.domain.check()
    _check_domain(cfg)


def _check_domain(cfg: Config) -> None:
    """Domain decomposition makes its own plan, on whole samples of one level, with the
    gradient reduction of its coherent model: what it cannot be combined with."""
    if not cfg.domain.on:
        return
    key, grid = "domain.grid", list(cfg.domain.grid)
    require(not cfg.stages, key, grid,
            "domain decomposition makes its own plan (local CNNs, aggregator, coherent "
            "model); remove the [[stages]] tables, or the [domain] table")
    require(cfg.comm.backend == "ddp", key, grid,
            "the coherent model reduces its gradients over two kinds of rank groups, which "
            "runs on torch.distributed only: set comm.backend = \"ddp\"")
    require(not cfg.task.restoration, key, grid,
            f"task.kind = {cfg.task.kind!r} maps images to images; domain decomposition "
            "combines local predictions of labels or classes: use task.kind = "
            "\"regression\" or \"classify\"")
    t = cfg.train
    require(t.estimator != "mge" and not t.downsample.on, key, grid,
            "the local CNNs train on their sub-domains at one level: set train.estimator = "
            "\"single\" and train.downsample.fraction = 0")


def _check_task_and_model(cfg: Config) -> None:
    """An image task needs an image-to-image network, labels the others, and classes a
    network that outputs logits."""
    task, model = cfg.task, cfg.model
    if task.restoration and not model.image_to_image:
        raise ConfigError(
            f"task.kind = {task.kind!r} restores images, but model.name = {model.name!r} "
            "predicts labels; use model.name = \"unet\" or \"resnet2d\" (or \"espcn\" "
            "with task.sr_input = \"half\")")
    if model.image_to_image and not task.restoration:
        raise ConfigError(
            f"model.name = {model.name!r} maps images to images, but task.kind = "
            f"{task.kind!r} fits labels; set task.kind to an image task (denoise, noise, "
            "deblur, inpaint, sr) or use model.name = \"cosmoflow\", \"neuron_inverter\" "
            "or \"convnet2d\"")
    if task.classify and model.name != "convnet2d":
        raise ConfigError(
            f"task.kind = \"classify\" needs class logits, but model.name = {model.name!r} "
            "ends in a scaled tanh for labels in [-1, 1]; use model.name = \"convnet2d\" "
            "(2D images)")
    half = task.kind == "sr" and task.sr_input == "half"
    if (model.name == "espcn") != half:
        raise ConfigError(
            "model.name = \"espcn\" upscales a half-size input: use it with task.kind = "
            "\"sr\" and task.sr_input = \"half\"" if model.name == "espcn" else
            "task.sr_input = \"half\" gives the model a half-size image to upscale, which "
            "only model.name = \"espcn\" does; use sr_input = \"prolonged\" with a unet or "
            "resnet2d")


def _check_downsample_model(prefix: str, train: TrainConfig, model: ModelConfig) -> None:
    """A downsampled step runs the model on smaller inputs through pooled kernels: the
    dense layers must not depend on the map size, and no kernel may be dilated."""
    down = train.downsample
    if not down.on:
        return
    key = f"{prefix}.downsample.fraction"
    require(train.estimator != "mge", key, down.fraction,
            f"{prefix}.estimator = 'mge' already trains on coarser levels by its own "
            "corrections; use either mge or dynamic downsampling, not both (fraction = 0)")
    require(model.head == "gap" or model.image_to_image, key, down.fraction,
            f"downsampled steps need a model that takes any input size: set model.head = "
            f"'gap' (not {model.head!r}), or fraction = 0")
    require(model.kernel_level == 0, key, down.fraction,
            "downsampled steps cannot pool the dilated kernels of model.kernel_level = "
            f"{model.kernel_level}: set model.kernel_level = 0, or fraction = 0")


__all__ = ["FUSIONS", "CommConfig", "Config", "DataConfig", "LogConfig", "ModelConfig",
           "RunConfig", "StageConfig", "TaskConfig", "TrainConfig"]
