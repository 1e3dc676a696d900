"""The run configuration: a typed schema (no JAX), its value ranges, TOML loading with overrides, and the checks
of combinations. `from genesis_jax import config` gives the schema and the loader under one name."""

from .load import (
    apply_overrides,
    config_hash,
    diff,
    from_dict,
    load,
    resolve_model,
    to_dict,
    to_dict_for_overrides,
    to_toml,
)
from .schema import (
    SECTIONS,
    CheckpointConfig,
    Config,
    CurriculumConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    ModelSpec,
    MTLConfig,
    OptimConfig,
    ParallelConfig,
    TrainingConfig,
)

__all__ = [
    "SECTIONS",
    "CheckpointConfig",
    "Config",
    "CurriculumConfig",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "MTLConfig",
    "ModelConfig",
    "ModelSpec",
    "OptimConfig",
    "ParallelConfig",
    "TrainingConfig",
    "apply_overrides",
    "config_hash",
    "diff",
    "from_dict",
    "load",
    "resolve_model",
    "to_dict",
    "to_dict_for_overrides",
    "to_toml",
]
