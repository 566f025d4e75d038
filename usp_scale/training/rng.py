"""Explicit randomness of a training step: one generator per micro-step, derived from (seed, step, rank, micro).

The task's loss receives it and passes it to every draw (MAE mask noise, the noisy-input t and eps, the diffusion
t and noise, the DiT/SiT label drop as ``force_drop_ids``, the flow t and noise). Nothing in a training step reads
the global RNGs, so a resumed run draws exactly what the uninterrupted one would at the same (step, rank, micro)
without saving any RNG state, and data loading or evaluation cannot shift the stream.
"""
from __future__ import annotations

import torch

from ..data.transforms import sample_seed

STREAM = 0x5452  # separates the training stream from the data streams that also derive seeds from cfg.seed


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A 63-bit seed for micro-step ``micro`` of optimizer step ``step`` (0-based, the step being computed) on
    ``rank``."""
    return sample_seed(seed, STREAM, step, rank, micro)


def step_generator(seed: int, step: int, rank: int, micro: int, device) -> torch.Generator:
    """A generator on ``device`` seeded with :func:`step_seed` (the draws stay on the device: no host sync)."""
    return torch.Generator(device=torch.device(device)).manual_seed(step_seed(seed, step, rank, micro))
