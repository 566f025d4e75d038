"""Model-only exports: safetensors for transfer/sampling, and the official .pth formats.

Official formats: MAE pretraining ``{"model": state_dict}`` (``checkpoint-{epoch}.pth``);
DiT/SiT ``{"model", "ema", "opt", "args"}`` (``{step:07d}.pt``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def _contig(sd: dict) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def save_safetensors(state_dict: dict, path: str, metadata: Optional[dict] = None) -> str:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(_contig(state_dict), tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return path


def load_safetensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def save_official(path: str, task: str, model_sd: dict, *, ema_sd: Optional[dict] = None,
                  opt_sd: Optional[dict] = None, args: Optional[dict] = None) -> str:
    """Write the official-format checkpoint of ``task`` (pretrain -> MAE, dit/sit -> DiT/SiT)."""
    if task == "pretrain":
        obj = {"model": _contig(model_sd)}
    elif task in ("dit", "sit"):
        if ema_sd is None:
            raise ValueError("DiT/SiT official export needs the EMA weights (set ema.decay > 0)")
        obj = {"model": _contig(model_sd), "ema": _contig(ema_sd), "opt": opt_sd, "args": args}
    else:  # cls / linprobe: MAE finetune format
        obj = {"model": _contig(model_sd), "args": args}
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path
