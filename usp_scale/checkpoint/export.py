"""Model-only exports: safetensors for transfer/sampling (:func:`usp_scale.fileio.save_safetensors`), and the
official .pth formats.

Official formats: MAE pretraining ``{"model": state_dict}`` (``checkpoint-{epoch}.pth``);
DiT/SiT ``{"model", "ema", "opt", "args"}`` (``{step:07d}.pt``). ``args`` is the resolved config as a plain
dict, so the files load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from typing import Optional

from ..fileio import save_safetensors, torch_save  # noqa: F401 - save_safetensors: re-exported by the package


def _contig(sd: dict) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


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
    return torch_save(obj, path)
