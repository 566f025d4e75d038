"""Per-iteration learning-rate schedules (docs/method.md §2.6).

``cosine``: with W warmup steps and T total optimizer steps,
lr(s) = lr * s / W for s < W, else min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (s - W) / (T - W))).
This equals MAE's rule on the fractional epoch e = s * accum_iter / iters_per_epoch with
W = warmup_epochs * iters_per_epoch / accum_iter. The first step has lr 0.
``constant``: lr for every step (DiT/SiT).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigError


def absolute_lr(optim_cfg, global_batch: int) -> float:
    """optim.lr when set, else blr * global_batch / 256."""
    return optim_cfg.lr if optim_cfg.lr > 0 else optim_cfg.blr * global_batch / 256


@dataclass
class LRSchedule:
    name: str
    lr: float
    min_lr: float
    warmup_steps: float
    total_steps: int

    @classmethod
    def from_config(cls, sched_cfg, optim_cfg, *, global_batch: int, steps_per_epoch: int) -> "LRSchedule":
        """``steps_per_epoch`` = optimizer steps per epoch (micro-batches per epoch // accum_iter)."""
        if sched_cfg.name not in ("cosine", "constant"):
            raise ConfigError(f"schedule.name={sched_cfg.name!r}: use 'cosine' or 'constant'")
        total = sched_cfg.max_steps if sched_cfg.max_steps > 0 else sched_cfg.epochs * steps_per_epoch
        if total <= 0:
            raise ConfigError("schedule: set schedule.epochs > 0 or schedule.max_steps > 0")
        warm = float(sched_cfg.warmup_steps) if sched_cfg.warmup_steps > 0 else sched_cfg.warmup_epochs * steps_per_epoch
        return cls(sched_cfg.name, absolute_lr(optim_cfg, global_batch), optim_cfg.min_lr, warm, int(total))

    def __call__(self, step: int) -> float:
        if self.name == "constant":
            return self.lr
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1e-12)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, param_groups, step: int) -> float:
        lr = self(step)
        for g in param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"name": self.name, "lr": self.lr, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            setattr(self, k, v)
