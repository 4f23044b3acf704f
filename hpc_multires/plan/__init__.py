"""Run configuration: typed, validated once at the edge, printed and saved by rank 0."""

from hpc_multires.plan.config import (
    CommConfig,
    Config,
    DataConfig,
    LogConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from hpc_multires.plan.load import apply_overrides, config_to_toml, load_config

__all__ = [
    "CommConfig",
    "Config",
    "DataConfig",
    "LogConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_to_toml",
    "load_config",
]
