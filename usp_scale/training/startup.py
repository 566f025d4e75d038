"""Start-up resolution of a job's batch and precision semantics, once, before anything is built.

:func:`resolve_startup` is called by the trainer with the world size. It rewrites ``cfg`` in place, so the
resolved ``config.yaml`` of the run records what ran:

* **Global batch** (``data.global_batch_size`` > 0): the batch of one optimizer step over all ranks and
  accumulation micro-steps, as the paper states it (4096 for pretraining, 256 for DiT/SiT). Per-rank batch =
  global / world size; it is split into ``schedule.accum_iter`` equal micro-steps of ``data.batch_size``, the
  fewest whose size stays within ``data.micro_batch_size``. The learning rate (``blr x global / 256`` or an absolute
  ``optim.lr``), the number of samples per step and hence the schedule are the same for 1, 8 or 64 GPUs. A global
  batch that does not divide over the ranks, or a per-rank batch that cannot be split near the bound, is a
  :class:`~usp_scale.config.ConfigError` naming the keys.
* **Precision** (``engine.precision: official``): the official code's precision of the task, from
  :data:`OFFICIAL_PRECISION`: fp16 autocast + GradScaler for pretraining and classification, fp32 with TF32 for
  DiT/SiT; gradients reduced in fp32 in both.
* **TF32** (``engine.tf32``) is applied to torch's global matmul/cuDNN switches.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..config import ConfigError

# task -> (engine.precision, engine.tf32) of the official code. Gradients are all-reduced in fp32 for every task.
OFFICIAL_PRECISION = {"pretrain": ("fp16", False), "cls": ("fp16", False), "linprobe": ("fp16", False),
                      "dit": ("fp32", True), "sit": ("fp32", True)}
REDUCE_DTYPES = ("fp32", "bf16")


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


def _split(per_rank: int, bound: int) -> int:
    """The micro-batch: ``per_rank`` itself within the bound, else its largest divisor <= bound, which must be at
    least half the bound (so that a bad bound does not turn into hundreds of tiny micro-steps)."""
    if bound <= 0 or per_rank <= bound:
        return per_rank
    micro = max(d for d in range(1, bound + 1) if per_rank % d == 0)
    if 2 * micro < bound:
        good = [d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= 2 * bound][-3:]
        raise ConfigError(f"the per-rank batch {per_rank} cannot be split into equal micro-steps between "
                          f"{bound // 2} and data.micro_batch_size={bound} (its largest divisor within the bound is "
                          f"{micro}): set data.micro_batch_size to a divisor of {per_rank}, e.g. {good}, or change "
                          "data.global_batch_size or the number of ranks")
    return micro


def plan_batch(data_cfg, sched_cfg, world_size: int) -> BatchPlan:
    """The batch layout for ``world_size`` ranks (see the module docstring); raises ConfigError naming the keys."""
    world_size = int(world_size)
    g = data_cfg.global_batch_size
    if g < 0 or data_cfg.micro_batch_size < 0:
        raise ConfigError(f"data.global_batch_size={g} and data.micro_batch_size={data_cfg.micro_batch_size} must be "
                          ">= 0 (0 = off)")
    if g == 0:
        b, a = data_cfg.batch_size, sched_cfg.accum_iter
        return BatchPlan(b * a * world_size, world_size, b, a, derived=False)
    if g % world_size:
        lo, hi = g // world_size * world_size, (g // world_size + 1) * world_size
        raise ConfigError(f"data.global_batch_size={g} does not divide over {world_size} ranks (the world size): "
                          f"run on a number of GPUs that divides {g}, or set data.global_batch_size to a multiple of "
                          f"{world_size} (e.g. {lo or hi} or {hi}; the learning rate follows it through optim.blr)")
    per_rank = g // world_size
    micro = _split(per_rank, data_cfg.micro_batch_size)
    return BatchPlan(g, world_size, micro, per_rank // micro, derived=True)


def apply_batch_plan(cfg, plan: BatchPlan) -> None:
    """Write the plan into ``data.batch_size`` / ``schedule.accum_iter``, warning about a value it replaces."""
    if not plan.derived:
        return
    from ..config.schema import DataConfig, ScheduleConfig

    for key, old, new, default in (
            ("data.batch_size", cfg.data.batch_size, plan.micro_batch, DataConfig.batch_size),
            ("schedule.accum_iter", cfg.schedule.accum_iter, plan.accum_iter, ScheduleConfig.accum_iter)):
        if old != new and old != default:  # a value left at the schema default was not chosen: no warning
            warnings.warn(f"{key}={old} replaced by {new}, derived from data.global_batch_size="
                          f"{plan.global_batch} on {plan.world_size} rank(s); bound the per-rank micro-batch with "
                          "data.micro_batch_size instead", UserWarning, stacklevel=3)
    cfg.data.batch_size, cfg.schedule.accum_iter = plan.micro_batch, plan.accum_iter


def resolve_precision(cfg) -> None:
    """``engine.precision: official`` -> the task's official precision and TF32; checks ``engine.reduce_dtype``."""
    e = cfg.engine
    if e.ddp_bf16_grads:
        raise ConfigError("engine.ddp_bf16_grads was replaced by engine.reduce_dtype: set engine.reduce_dtype=bf16 "
                          "(and drop engine.ddp_bf16_grads)")
    if e.reduce_dtype not in REDUCE_DTYPES:
        raise ConfigError(f"engine.reduce_dtype={e.reduce_dtype!r}: use one of {', '.join(REDUCE_DTYPES)}")
    if e.precision != "official":
        return
    if cfg.task not in OFFICIAL_PRECISION:
        raise ConfigError(f"engine.precision=official: no official precision for task={cfg.task!r}")
    if e.reduce_dtype != "fp32":
        raise ConfigError(f"engine.precision=official reduces gradients in fp32 (the official code), but "
                          f"engine.reduce_dtype={e.reduce_dtype}: set engine.precision to fp32/fp16/bf16 to reduce "
                          "in bf16, or drop engine.reduce_dtype")
    e.precision, e.tf32 = OFFICIAL_PRECISION[cfg.task]


def apply_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions (on); off restores torch's defaults (matmul off, cuDNN on)."""
    import torch

    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = True


def resolve_startup(cfg, world_size: int) -> BatchPlan:
    """Resolve the global batch and the precision of ``cfg`` in place for ``world_size`` ranks; returns the plan."""
    resolve_precision(cfg)
    plan = plan_batch(cfg.data, cfg.schedule, world_size)
    apply_batch_plan(cfg, plan)
    apply_tf32(cfg.engine.tf32)
    return plan
