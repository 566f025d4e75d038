"""Typed job configuration: schema dataclasses, YAML loading, dotted overrides, the rules, start-up resolution."""
from .errors import ConfigError
from .load import config_from_dict, format_help, load_config, save_config, to_dict
from .resolve import BatchPlan, resolve_job
from .schema import (MISSING, CheckpointConfig, DataConfig, EMAConfig, EngineConfig, EvalConfig, JobConfig,
                     MaskConfig, ModelConfig, OptimConfig, ScheduleConfig, VAEConfig)

__all__ = [
    "ConfigError", "config_from_dict", "format_help", "load_config", "save_config", "to_dict", "MISSING",
    "BatchPlan", "resolve_job", "CheckpointConfig", "DataConfig", "EMAConfig", "EngineConfig", "EvalConfig",
    "JobConfig", "MaskConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "VAEConfig",
]
