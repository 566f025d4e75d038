"""One engine interface over local / DDP / FSDP2 / DeepSpeed (see :mod:`usp_scale.engine.base`).

    engine = build_engine(cfg.engine, model, optimizer_factory, accum_iter=..., clip_grad=...,
                          device=..., micro_batch=cfg.data.batch_size)

The model code does not know which engine wraps it; switching engines is ``engine.name=...``. The engine
receives an optimizer *factory* (built by :func:`usp_scale.training.optim.build_optimizer` in the trainer) and
calls it on the wrapped module, so the optimizer sees the parameters the engine updates (FSDP2 DTensors, DeepSpeed's
initialize). Local, DDP and FSDP2 checkpoint through one DCP path (:meth:`Engine.save`), which can reshard a
checkpoint to another world size or between these engines; DeepSpeed keeps its own format.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the package stays light: importing usp_scale.engine must not import torch
    import torch
    import torch.nn as nn

ENGINES = ("local", "ddp", "fsdp2", "deepspeed")


def __getattr__(name):
    """Lazy re-exports (and submodules), so importing the package does not import torch."""
    import importlib

    lazy = {"Engine": "base", "StepResult": "base", "device_precision": "base",
            "apply_activation_checkpointing": "base", "apply_compile": "base"}
    if name in lazy:
        return getattr(importlib.import_module(f".{lazy[name]}", __name__), name)
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError:
        raise AttributeError(f"module 'usp_scale.engine' has no attribute {name!r}") from None


def build_engine(engine_cfg, model: "nn.Module", optimizer_factory: "Callable[[nn.Module], torch.optim.Optimizer]",
                 *, accum_iter: int = 1, clip_grad: float = 0.0, device=None, micro_batch: int = 1):
    """Move ``model`` to ``device``, apply AC / compile, wrap it and build its optimizer.

    ``optimizer_factory(module)`` is called on the (possibly sharded) module, after wrapping, so the
    optimizer sees the parameters the engine will update.
    """
    import torch

    from .base import apply_activation_checkpointing, apply_compile, device_precision

    device = torch.device("cpu") if device is None else device
    name = engine_cfg.name
    precision = device_precision(engine_cfg.precision, device)
    reduce_dtype = engine_cfg.reduce_dtype
    model = model.to(device)
    if engine_cfg.fp8 != "off":
        from .fp8 import apply_fp8

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
        from .local import LocalEngine

        return LocalEngine(model, optimizer_factory, **kw)
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(f"engine.name={name} needs the default process group: start the job with "
                           "usp_scale.runtime.init_runtime(cfg) first (it creates one, also for one process)")
    if name == "ddp":
        from .local import DDPEngine

        return DDPEngine(model, optimizer_factory, reduce_dtype=reduce_dtype, **kw)
    if name == "fsdp2":
        from .fsdp import FSDP2Engine

        return FSDP2Engine(model, optimizer_factory, reshard_after_forward=engine_cfg.reshard_after_forward,
                           shard_size=engine_cfg.fsdp_shard_size, reduce_dtype=reduce_dtype, **kw)
    from .deepspeed.engine import DeepSpeedEngine

    eng = DeepSpeedEngine(model, optimizer_factory, zero_stage=engine_cfg.zero_stage, micro_batch=micro_batch,
                          user_config=engine_cfg.deepspeed_config, reduce_dtype=reduce_dtype, **kw)
    eng.checkpoint_format = "deepspeed"  # its own save(dir)/load(dir), not DCP (the adapter may declare it itself)
    return eng


__all__ = ["Engine", "StepResult", "build_engine", "ENGINES",
           "apply_activation_checkpointing", "apply_compile", "device_precision"]
