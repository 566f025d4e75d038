"""Checkpoints: atomic step folders with keep-last-k and exact-resume state; model-only exports."""
from .export import save_official, save_safetensors
from .manager import (CheckpointManager, IncompatibleCheckpoint, diff_config, diff_signature, model_signature,
                      rng_state, set_rng_state)

__all__ = ["CheckpointManager", "IncompatibleCheckpoint", "model_signature", "rng_state", "set_rng_state",
           "diff_config", "diff_signature", "save_safetensors", "save_official"]
