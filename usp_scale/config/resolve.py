"""Start-up resolution of a job's batch and precision semantics, once, for the world size, before anything is built.

:func:`resolve_job` checks the rules that need the world size (:func:`usp_scale.config.validate.validate_runtime`)
and then rewrites ``cfg`` in place, so the resolved ``config.yaml`` of the run records what ran. Nothing here checks
a value: the rules did.

* **Global batch** (``data.global_batch_size`` > 0): the batch of one optimizer step over all ranks and
  accumulation micro-steps, as the paper states it (4096 for pretraining, 256 for DiT/SiT). Per-rank batch =
  global / world size; it is split into ``schedule.accum_iter`` equal micro-steps of ``data.batch_size``, the
  fewest whose size stays within ``data.micro_batch_size``. The learning rate (``blr x global / 256`` or an absolute
  ``optim.lr``), the number of samples per step and hence the schedule are the same for 1, 8 or 64 GPUs.
* **Precision** (``engine.precision: official``): the official code's precision of the task, from
  :data:`~usp_scale.config.schema.OFFICIAL_PRECISION`: fp16 autocast + GradScaler for pretraining and
  classification, fp32 with TF32 for DiT/SiT; gradients reduced in fp32 in both. ``engine.tf32`` is applied by
  :func:`usp_scale.runtime.init_runtime`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from .schema import OFFICIAL_PRECISION, DataConfig, ScheduleConfig
from .validate import micro_batch_for, validate_runtime


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's samples are laid out: global = world_size x accum_iter x micro_batch."""

    global_batch: int
    world_size: int
    micro_batch: int
    accum_iter: int
    derived: bool  # True when computed from data.global_batch_size

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.accum_iter

    def describe(self) -> str:
        src = "data.global_batch_size" if self.derived else "data.batch_size x schedule.accum_iter x world size"
        return (f"global batch {self.global_batch} ({src}) = {self.world_size} rank(s) x {self.accum_iter} "
                f"micro-step(s) x {self.micro_batch} per rank")


def plan_batch(data_cfg, sched_cfg, world_size: int) -> BatchPlan:
    """The batch layout for ``world_size`` ranks (see the module docstring) of a config that keeps the rules."""
    world_size = int(world_size)
    g = data_cfg.global_batch_size
    if g == 0:
        b, a = data_cfg.batch_size, sched_cfg.accum_iter
        return BatchPlan(b * a * world_size, world_size, b, a, derived=False)
    per_rank = g // world_size
    micro = micro_batch_for(per_rank, data_cfg.micro_batch_size)
    return BatchPlan(g, world_size, micro, per_rank // micro, derived=True)


def apply_batch_plan(cfg, plan: BatchPlan) -> None:
    """Write the plan into ``data.batch_size`` / ``schedule.accum_iter``, warning about a value it replaces."""
    if not plan.derived:
        return
    for key, old, new, default in (
            ("data.batch_size", cfg.data.batch_size, plan.micro_batch, DataConfig.batch_size),
            ("schedule.accum_iter", cfg.schedule.accum_iter, plan.accum_iter, ScheduleConfig.accum_iter)):
        if old != new and old != default:  # a value left at the schema default was not chosen: no warning
            warnings.warn(f"{key}={old} replaced by {new}, derived from data.global_batch_size="
                          f"{plan.global_batch} on {plan.world_size} rank(s); bound the per-rank micro-batch with "
                          "data.micro_batch_size instead", UserWarning, stacklevel=3)
    cfg.data.batch_size, cfg.schedule.accum_iter = plan.micro_batch, plan.accum_iter


def apply_official_precision(cfg) -> None:
    """``engine.precision: official`` -> the task's official precision and TF32."""
    if cfg.engine.precision == "official":
        cfg.engine.precision, cfg.engine.tf32 = OFFICIAL_PRECISION[cfg.task]


def resolve_job(cfg, world_size: int) -> BatchPlan:
    """Check the world-size rules, then resolve the global batch and the precision of ``cfg`` in place for
    ``world_size`` ranks; returns the plan."""
    validate_runtime(cfg, world_size)
    apply_official_precision(cfg)
    plan = plan_batch(cfg.data, cfg.schedule, world_size)
    apply_batch_plan(cfg, plan)
    return plan
