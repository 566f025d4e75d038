"""Reading model weights from the formats in circulation.

- official MAE / USP pretraining: ``{"model": state_dict, "optimizer": ..., "epoch": ..., "args": ...}``
- official DiT / SiT training: ``{"model", "ema", "opt", "args"}`` (EMA weights by default)
- a bare state dict (``.pt``/``.pth``/``.bin``) or a ``.safetensors`` file (this project's export)
A ``module.`` prefix left by DDP is stripped. Nothing is ever downloaded, and nothing in a file runs:
``.pt``/``.pth`` files load with ``weights_only=True`` and an explicit allowlist
(:func:`usp_scale.checkpoint.safe_load.torch_load`); every read error names the file.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..checkpoint.diff import diff_shapes
from ..checkpoint.safe_load import check_finite, read_safetensors, torch_load

StateDict = Dict[str, torch.Tensor]


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_state_dict(path: str, which: str = "auto") -> StateDict:
    """Load a state dict from ``path``.

    ``which``: "auto" (``ema`` when present, else ``model``, else the bare dict), "ema", "model".
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (give a local .pt/.pth/.safetensors file; "
                                f"nothing is downloaded)")
    if path.endswith(".safetensors"):
        sd = read_safetensors(path, what="checkpoint")
        check_finite(sd, path, what="checkpoint")
        return _strip_module(sd)
    return select_state_dict(torch_load(path, what="checkpoint"), path, which)


def select_state_dict(obj, path: str, which: str = "auto") -> StateDict:
    """The weights inside a loaded ``torch.save`` object (``path`` names it in errors; ``which`` as in
    :func:`read_state_dict`), ``module.`` prefix stripped; weights holding NaN/inf are refused naming the first
    bad key (:func:`usp_scale.checkpoint.safe_load.check_finite`)."""
    if which not in ("auto", "ema", "model"):
        raise ValueError(f"which must be auto, ema or model, got {which!r}")
    if _is_state_dict(obj):
        if which == "ema":
            raise KeyError(f"{path} is a bare state dict: it holds no 'ema' weights")
        sd = obj
    elif isinstance(obj, dict):
        order = {"auto": ("ema", "model", "state_dict", "module"), "ema": ("ema",), "model": ("model",)}[which]
        key = next((k for k in order if k in obj and isinstance(obj[k], dict)), None)
        if key is None:
            raise KeyError(f"{path}: no weights under {' / '.join(order)}; top-level keys: {sorted(obj)[:12]}")
        sd = obj[key]
    else:
        raise TypeError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    check_finite(sd, path, what="checkpoint")
    return _strip_module(sd)


def _strip_module(sd) -> StateDict:
    if any(k.startswith("module.") for k in sd):
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return dict(sd)


def diff_keys(model: nn.Module, sd: StateDict) -> str:
    """Human-readable difference between a model's state dict and ``sd`` (keys and shapes:
    :func:`usp_scale.checkpoint.diff.diff_shapes`). Empty when they fit."""
    return "\n".join(diff_shapes(sd, model.state_dict()))


def load_weights(model: nn.Module, path: str, which: str = "auto", state_dict: Optional[StateDict] = None) -> None:
    """Strictly load weights of the same architecture; on mismatch the error lists keys and shapes."""
    sd = state_dict if state_dict is not None else read_state_dict(path, which)
    problems = diff_keys(model, sd)
    if problems:
        raise ValueError(f"{path} does not fit {type(model).__name__}:\n{problems}")
    model.load_state_dict(sd, strict=True)
