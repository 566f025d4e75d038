"""Typed job configuration: schema dataclasses, YAML loading, dotted overrides."""
from .load import ConfigError, config_from_dict, format_help, load_config, save_config, to_dict
from .schema import (MISSING, CheckpointConfig, DataConfig, EMAConfig, EngineConfig, EvalConfig, JobConfig,
                     MaskConfig, ModelConfig, OptimConfig, ScheduleConfig, VAEConfig)

__all__ = [
    "ConfigError", "config_from_dict", "format_help", "load_config", "save_config", "to_dict", "MISSING",
    "CheckpointConfig", "DataConfig", "EMAConfig", "EngineConfig", "EvalConfig", "JobConfig", "MaskConfig",
    "ModelConfig", "OptimConfig", "ScheduleConfig", "VAEConfig",
]
