"""What a stage's trainer is given: its stage and the run's settings, no more.

The driver derives both from the plan (`plan.stages.Stage`, `plan.config.Config`); the
training layer never reads the plan itself, so it can be driven by anything that fills
these in (a test, a benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hpc_multires.comm.config import CommConfig
from hpc_multires.data.config import DataConfig
from hpc_multires.train.config import LogConfig, TrainConfig


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """One stage as the trainer sees it."""

    name: str
    """The stage's name: in every record, checkpoint, and the seeds of its steps."""
    level: int
    """The pyramid level it trains on."""
    group: str
    """Its rank group's name, for the records."""
    ranks: tuple[int, ...]
    """The job ranks that run it (its Horovod process set)."""
    train: TrainConfig
    """Its training settings, the plan's overrides and the per-level rules applied (its
    global batch and lr are the scaled ones)."""
    lr_factor: float = 1.0
    """The per-level rules raised the configured lr by this factor (train.lr_scale): the
    first train.lr_scale_warmup_steps steps rise to the scaled rate from the configured
    one."""
    crop: int = 0
    """Window size in points per axis (0: whole samples)."""
    fused: bool = False
    """Its start is a fusion of earlier stages (logged: the fused model's metrics)."""
    region_start: tuple[int, ...] = ()
    """A fixed block of every sample it reads, trains and validates on (a sub-domain of
    domain decomposition): where it starts per spatial axis; empty: whole samples."""
    region_shape: tuple[int, ...] = ()
    """That block's points per spatial axis."""


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """The run-wide settings a stage's trainer reads."""

    seed: int
    """The run's seed: data order, windows and dropout masks follow from it."""
    data: DataConfig = field(default_factory=DataConfig)
    """How batches are read (reader processes, prefetch, read timeout)."""
    log: LogConfig = field(default_factory=LogConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    """The gradient allreduce backend's settings (Horovod's compression)."""
    dropout: bool = False
    """The model has random layers: each step seeds them from (seed, stage, step, rank)."""
    config_record: dict[str, Any] = field(default_factory=dict)
    """The run's whole config, stored in every checkpoint as it is (the driver compares it
    on resume)."""
