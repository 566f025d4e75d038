"""Turn a DiT/SiT module into the ``model(x, t, y)`` callable the samplers use."""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from .cfg import CFGModel

PRECISIONS = ("fp32", "bf16")


def _unwrap(model):
    """The bare module inside DDP / FSDP / DeepSpeed (``.module``) and torch.compile (``._orig_mod``)."""
    for _ in range(4):
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None:
            break
        model = inner
    return model


def infer_latent_shape(model) -> Tuple[int, int, int]:
    """(C, H, W) of the model's input latents, from ``in_channels`` and ``x_embedder.img_size``."""
    model = _unwrap(model)
    try:
        size = model.x_embedder.img_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return (int(model.in_channels), int(size), int(size))
    except AttributeError as e:
        raise ValueError("cannot infer the latent shape from the model (needs .in_channels and "
                         ".x_embedder.img_size); pass latent_shape=(C, H, W)") from e


def infer_num_classes(model) -> int:
    model = _unwrap(model)
    try:
        return int(model.y_embedder.num_classes)
    except AttributeError as e:
        raise ValueError("cannot infer the number of classes (needs .y_embedder.num_classes); "
                         "pass num_classes") from e


def make_model_fn(model, *, num_classes: int, cfg_scale: float = 1.0, cfg_channels: int = 0,
                  interval: Optional[Tuple[float, float]] = None, precision: str = "fp32"):
    """``model(x, t, y)`` in ``precision`` (bf16 = autocast) returning float32, wrapped in CFG when
    ``cfg_scale != 1`` (``cfg_channels`` 0 = all latent channels, 3 = official).

    REPA models return ``(output, zs)``: the projected tokens are dropped. A model in REPA's time convention
    (``time_reversed``: t = 0 data, v = eps - x; usp_scale/models/repa.py) is evaluated as ``-model(x, 1 - t)``,
    the same field in the samplers' convention (t = 0 noise, v = x - eps); ``interval`` is in the samplers' t."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    reversed_time = bool(getattr(_unwrap(model), "time_reversed", False))

    def base(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16"
               else contextlib.nullcontext())
        with ctx:
            out = model(x, 1 - t if reversed_time else t, y)
        if isinstance(out, tuple):   # REPA: (output, projected tokens)
            out = out[0]
        return -out.float() if reversed_time else out.float()

    if cfg_scale == 1.0:
        return base
    return CFGModel(base, cfg_scale, num_classes, guided_channels=cfg_channels or None, interval=interval)
