"""Checkpoints: atomic step folders (keep-last-k) of a run's stateful parts, engine state through DCP; exports."""
from .dcp import DCPState
from .export import save_official
from .manager import CheckpointManager, IncompatibleCheckpoint, diff_config, diff_signature, model_signature

__all__ = ["CheckpointManager", "DCPState", "IncompatibleCheckpoint", "model_signature",
           "diff_config", "diff_signature", "save_official"]
