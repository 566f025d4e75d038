"""The DeepSpeed engine: ``deepspeed.initialize`` over our model and torch optimizer, behind
:class:`usp_scale.engine.base.Engine`. DeepSpeed does accumulation and clipping; its config
comes from :mod:`.config`, its checkpoints, gathered state and EMA layouts from :mod:`.state`."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ...config import ConfigError
from ... import runtime as D
from ..base import Engine, StepResult, poison_nonfinite
from . import DEEPSPEED_RANGE
from . import state as S
from .config import build_config


def check_version(version: str) -> None:
    """A :class:`ConfigError` unless DeepSpeed ``version`` is in :data:`DEEPSPEED_RANGE`, the versions the tests
    pass on: earlier 0.19 releases skip no step on a NaN loss under ZeRO-1 and report another gradient norm, and
    :mod:`.state` reads DeepSpeed internals that other versions may lay out differently."""
    from packaging.specifiers import SpecifierSet

    if not SpecifierSet(DEEPSPEED_RANGE).contains(version, prereleases=True):
        raise ConfigError(f"engine.name=deepspeed: DeepSpeed {version} is installed, usp_scale is tested with "
                          f"deepspeed{DEEPSPEED_RANGE}: pip install 'deepspeed{DEEPSPEED_RANGE}' (the "
                          "usp_scale[deepspeed] extra)")


class DeepSpeedEngine(Engine):
    """ZeRO-1/2/3 over our model and the optimizer ``optimizer_factory(model)`` builds. Its parts:
    ``weights`` (:class:`~.state.ZeroWeights`: the EMA always follows fp32 weights, gathered from the ZeRO
    partitions) and ``state`` (:class:`~.state.DeepSpeedState`: DeepSpeed's own checkpoint files)."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, optimizer_factory, *, zero_stage: int = 2, micro_batch: int = 1,
                 user_config: str = "", reduce_dtype: str = "fp32", **kw):
        super().__init__(model, **kw)
        import deepspeed

        check_version(deepspeed.__version__)
        self.scaler = None  # DeepSpeed owns loss scaling
        cfg = build_config(micro_batch=micro_batch, accum_iter=self.accum_iter, world_size=D.get_world_size(),
                           zero_stage=zero_stage, precision=self.precision, clip_grad=self.clip_grad,
                           reduce_dtype=reduce_dtype, device_type=self.device.type, user_config=user_config)
        zero_stage = cfg["zero_optimization"]["stage"]
        bit16 = bool(cfg.get("bf16", {}).get("enabled")) or bool(cfg.get("fp16", {}).get("enabled"))
        optimizer = optimizer_factory(model)
        # Parameter names of each param group, in the optimizer's order (DeepSpeed replaces the groups' params
        # by flat partitions): the index layout of a torch optimizer state dict over the same groups.
        names = {id(p): n for n, p in model.named_parameters()}
        group_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        self.client_optimizer = optimizer
        # In bf16/fp16 DeepSpeed casts the module first and builds its fp32 masters from the cast weights, which
        # would drop the low bits of fp32 weights (a transferred checkpoint, the fp32 init). Keep them (on the
        # host) and write them back into the masters.
        fp32 = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters()
                if p.requires_grad and p.dtype == torch.float32} if bit16 else {}
        # The frozen fp32 tensors (the fixed sin-cos position tables, float buffers) have no master: the cast
        # rounds them to bf16/fp16 for good. Keep their fp32 values for the exports (ZeroWeights).
        frozen = {n: t.detach().to("cpu", torch.float32, copy=True)
                  for n, t in [*((n, p) for n, p in model.named_parameters() if not p.requires_grad),
                               *model.named_buffers()]
                  if t.dtype == torch.float32} if bit16 else {}
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
        self.unwrapped = self.model.module
        if fp32:
            from deepspeed.utils import safe_set_full_fp32_param

            for n, p in self.unwrapped.named_parameters():
                if n in fp32:
                    safe_set_full_fp32_param(p, fp32[n].to(self.device))
        self.weights = S.ZeroWeights(self.model, optimizer, zero_stage=zero_stage,
                                     ema_from_masters=zero_stage in (1, 2) and bit16, group_names=group_names,
                                     frozen_fp32=frozen)
        self.state = S.DeepSpeedState(self.model, cfg, self.weights.layout,
                                      what=f"ZeRO-{zero_stage}, {self.precision}")

    # ---------------------------------------------------------------- backward / step
    def backward(self, loss):
        self.model.backward(poison_nonfinite(loss))

    def step(self) -> Optional[StepResult]:
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.step()
        self.micro_step = (self.micro_step + 1) % self.accum_iter
        if not boundary:
            return None
        norm = self.model.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        applied = bool(self.model.was_step_applied())
        if norm != norm or norm in (float("inf"), float("-inf")):
            applied = False
        return StepResult.from_host(applied, norm, device=self.device)

    def _zero_grad(self):
        self.model.zero_grad()

    @property
    def param_groups(self):
        return self.client_optimizer.param_groups
