"""Model-only exports: safetensors for transfer/sampling (:func:`usp_scale.fileio.save_safetensors`), and the
official .pth formats.

Official formats: MAE pretraining ``{"model": state_dict}`` (``checkpoint-{epoch}.pth``);
DiT/SiT ``{"model", "ema", "opt", "args"}`` (``{step:07d}.pt``). ``args`` is the resolved config as a plain
dict, so the files load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from ..fileio import torch_save


def _contig(sd: dict) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def save_official(path: str, parts: dict) -> str:
    """Write an official-format checkpoint holding ``parts`` in their order (the task declares which:
    ``Task.official_keys``): "model" and "ema" are state dicts (written contiguous, on the CPU), "opt" an optimizer
    state dict, "args" the resolved config as a plain dict."""
    obj = {k: _contig(v) if k in ("model", "ema") else v for k, v in parts.items()}
    return torch_save(obj, path)
