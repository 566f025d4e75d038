"""The trainer's own stateful parts: the step counters (:class:`TrainState`) and the data position
(:class:`LoaderPosition`), each with ``state_dict``/``load_state_dict`` for the checkpoint manager.

Both are kept independent of the world size: the data position is stored as the number of *global* samples the
epoch has consumed, so a run saved on 2 ranks resumes on 1 or 4 at the same place in the data order (the sharded
sampler gives every rank ``order[rank::world]`` of one global permutation, so step k covers the same global samples
on any world size).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Deque


@dataclass
class TrainState:
    """Optimizer steps done, the epoch and the micro-batches consumed in it, and the non-finite counters."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    # optimizer steps of the non-finite steps inside the rate window, oldest first
    nonfinite_recent: Deque[int] = field(default_factory=collections.deque)
    # samples per micro-step over all ranks (micro-batch x world size): converts micro_in_epoch across world sizes
    samples_per_micro: int = 1

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "samples_in_epoch": self.micro_in_epoch * self.samples_per_micro,
                "nonfinite_total": self.nonfinite_total, "nonfinite_streak": self.nonfinite_streak,
                "nonfinite_recent": list(self.nonfinite_recent)}

    def load_state_dict(self, sd: dict) -> None:
        samples = int(sd["samples_in_epoch"])
        if samples % self.samples_per_micro:
            raise ValueError(f"train state: {samples} samples consumed in the epoch do not make whole micro-steps of "
                             f"{self.samples_per_micro} samples (data.batch_size x world size) on this run")
        self.step, self.epoch, self.micro_in_epoch = int(sd["step"]), int(sd["epoch"]), samples // self.samples_per_micro
        self.nonfinite_total, self.nonfinite_streak = int(sd["nonfinite_total"]), int(sd["nonfinite_streak"])
        self.nonfinite_recent = collections.deque(int(s) for s in sd["nonfinite_recent"])


class LoaderPosition:
    """The training loader's epoch and position as global samples (see the module docstring). Wraps a loader
    with the resumable contract of :mod:`usp_scale.data.loaders` (``state_dict`` with epoch, position in batches
    of this rank, world size and seed)."""

    def __init__(self, loader, samples_per_batch: int):
        self.loader = loader
        self.samples_per_batch = int(samples_per_batch)  # per-rank batch x world size

    def state_dict(self) -> dict:
        sd = self.loader.state_dict()
        return {"epoch": int(sd["epoch"]), "samples": int(sd["position"]) * self.samples_per_batch,
                "seed": sd.get("seed")}

    def load_state_dict(self, sd: dict) -> None:
        own = self.loader.state_dict()
        if sd.get("seed") != own.get("seed"):
            raise ValueError(f"loader state was saved with seed={sd.get('seed')} but this loader has "
                             f"seed={own.get('seed')}; the data order would differ")
        if sd["samples"] % self.samples_per_batch:
            raise ValueError(f"loader state: {sd['samples']} samples consumed in epoch {sd['epoch']} are not whole "
                             f"batches of {self.samples_per_batch} samples (data.batch_size x world size) here")
        self.loader.load_state_dict({**own, "epoch": sd["epoch"], "position": sd["samples"] // self.samples_per_batch})
