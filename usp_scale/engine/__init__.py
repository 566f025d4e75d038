"""One engine interface over local / DDP / FSDP2 / DeepSpeed: parallelize + step (:mod:`usp_scale.engine.base`).

    engine = build_engine(cfg.engine, model, optimizer_factory, accum_iter=..., clip_grad=...,
                          device=runtime.device, micro_batch=cfg.data.batch_size)

The model code does not know which engine wraps it; switching engines is ``engine.name=...``. The engine
receives an optimizer *factory* (built by :func:`usp_scale.training.optim.build_optimizer` in the trainer) and
calls it on the wrapped module, so the optimizer sees the parameters the engine updates (FSDP2 DTensors, DeepSpeed's
initialize). Its two parts, ``engine.weights`` (EMA sources, gathered full state) and ``engine.state`` (checkpoint
I/O), are the same interface on every engine; local, DDP and FSDP2 checkpoint through one DCP path
(:class:`usp_scale.checkpoint.dcp.DCPState`), which can reshard a checkpoint to another world size or between these
engines; DeepSpeed keeps its own format. Importing this package imports neither deepspeed nor torchao (their
adapters import them when an engine needs them).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .base import (Engine, StepResult, Weights, apply_activation_checkpointing, apply_compile, device_precision)
from .deepspeed.engine import DeepSpeedEngine
from .fp8 import apply_fp8
from .fsdp import FSDP2Engine, is_meta
from .local import DDPEngine, LocalEngine

# Engines that build the model on the meta device and initialise it after sharding (from the full state dict of
# the model built on rank 0): no other rank ever holds the whole model.
INITIALISE_AFTER_SHARDING = ("fsdp2",)


def build_engine(engine_cfg, model: nn.Module, optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer],
                 *, accum_iter: int = 1, clip_grad: float = 0.0, device=None, micro_batch: int = 1,
                 init_state: Optional[dict] = None) -> Engine:
    """Apply FP8 / AC / compile to ``model``, wrap it and build its optimizer; pure: the config was checked when it
    loaded, and the process group exists (:func:`usp_scale.runtime.init_runtime`).

    ``optimizer_factory(module)`` is called on the (possibly sharded) module, after wrapping, so the optimizer
    sees the parameters the engine will update. A model on the meta device (only for the engines of
    :data:`INITIALISE_AFTER_SHARDING`) is initialised after sharding from ``init_state``, the full state dict of
    the same model built on rank 0.
    """
    device = torch.device("cpu") if device is None else device
    name = engine_cfg.name
    precision = device_precision(engine_cfg.precision, device)
    if is_meta(model):
        if name not in INITIALISE_AFTER_SHARDING:
            raise ValueError(f"engine.name={name} needs the model built on a device, not on meta (only "
                             f"{', '.join(INITIALISE_AFTER_SHARDING)} initialise it after sharding)")
    else:
        model = model.to(device)
    if engine_cfg.fp8 != "off":
        apply_fp8(model, engine_cfg.fp8, device)
    if engine_cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if engine_cfg.compile:
        scope = engine_cfg.compile_scope
        if scope == "auto":  # FSDP2/ZeRO hooks sit on the blocks: compile those; elsewhere the whole graph
            scope = "model" if name in ("local", "ddp") else "blocks"
        apply_compile(model, scope)
    kw = dict(accum_iter=accum_iter, clip_grad=clip_grad, precision=precision, device=device)
    if name == "local":  # nothing is reduced
        return LocalEngine(model, optimizer_factory, **kw)
    if not dist.is_initialized():
        raise RuntimeError(f"engine.name={name} needs the default process group: start the job with "
                           "usp_scale.runtime.init_runtime(cfg) first (it creates one, also for one process)")
    if name == "ddp":
        return DDPEngine(model, optimizer_factory, reduce_dtype=engine_cfg.reduce_dtype, **kw)
    if name == "fsdp2":
        return FSDP2Engine(model, optimizer_factory, reshard_after_forward=engine_cfg.reshard_after_forward,
                           shard_size=engine_cfg.fsdp_shard_size, reduce_dtype=engine_cfg.reduce_dtype,
                           init_state=init_state, **kw)
    return DeepSpeedEngine(model, optimizer_factory, zero_stage=engine_cfg.zero_stage, micro_batch=micro_batch,
                           user_config=engine_cfg.deepspeed_config, reduce_dtype=engine_cfg.reduce_dtype, **kw)


__all__ = ["Engine", "StepResult", "Weights", "build_engine", "INITIALISE_AFTER_SHARDING",
           "apply_activation_checkpointing", "apply_compile", "device_precision"]
