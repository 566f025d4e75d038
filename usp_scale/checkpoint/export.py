"""Model-only exports: safetensors for transfer/sampling (:func:`usp_scale.fileio.save_safetensors`), and the
official .pth formats.

Official formats: MAE pretraining ``{"model": state_dict}`` (``checkpoint-{epoch}.pth``);
DiT/SiT ``{"model", "ema", "opt", "args"}`` (``{step:07d}.pt``). ``args`` is the resolved config as a plain
dict, so the files load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from typing import Sequence

from ..fileio import torch_save

# the keys of our param groups that the official single group does not have (usp_scale.training.optim.param_groups)
_OUR_GROUP_KEYS = ("params", "param_names", "weight_decay", "lr_scale")


class OfficialFormatError(ValueError):
    """An export that cannot be written in an official format (names the key and what would fix it)."""


def _contig(sd: dict) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def save_official(path: str, parts: dict) -> str:
    """Write an official-format checkpoint holding ``parts`` in their order (the task declares which:
    ``Task.official_keys``): "model" and "ema" are state dicts (written contiguous, on the CPU), "opt" an optimizer
    state dict, "args" the resolved config as a plain dict."""
    obj = {k: _contig(v) if k in ("model", "ema") else v for k, v in parts.items()}
    return torch_save(obj, path)


def official_optimizer_state(opt_sd: dict, param_order: Sequence[str], weight_decay: float = 0.0,
                             source: str = "") -> dict:
    """Our optimizer state dict (torch's index-keyed format over our decay / no-decay groups, whose ``param_names``
    name each index) re-keyed into the official DiT/SiT grouping: ONE group over ``model.parameters()``
    (``param_order``: the model's parameter names in that order, frozen ones included, as
    ``torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)`` builds it), so that the official training
    code's ``opt.load_state_dict(ckpt["opt"])`` accepts it. Parameters without state (frozen) keep none. The one
    group's hyper-parameters are ours (lr, betas, eps, ...), ``weight_decay`` the official code's (0); a
    hyper-parameter that differs between our groups besides the weight decay cannot be one group (an error)."""
    groups = opt_sd.get("param_groups", [])
    if not groups or any("param_names" not in g for g in groups):
        raise OfficialFormatError(f"{source}: the optimizer state has no param_names in its groups (written by an "
                                  "older version?): re-export it from the run's checkpoint with this version")
    hyper = {}
    for g in groups:
        for k, v in g.items():
            if k in _OUR_GROUP_KEYS:
                continue
            if k in hyper and hyper[k] != v:
                raise OfficialFormatError(f"{source}: optimizer groups differ in {k!r} ({hyper[k]!r} vs {v!r}); the "
                                          "official code trains one group, so this state cannot be its 'opt'")
            hyper[k] = v
    index = {n: i for i, n in enumerate(param_order)}
    state = {}
    for g in groups:
        for old, name in zip(g["params"], g["param_names"]):
            if name not in index:
                raise OfficialFormatError(f"{source}: optimizer parameter {name!r} is not a parameter of the model")
            if old in opt_sd["state"]:
                state[index[name]] = opt_sd["state"][old]
    return {"state": dict(sorted(state.items())),
            "param_groups": [{**hyper, "weight_decay": weight_decay, "params": list(range(len(param_order)))}]}
