"""Optimizers: parameter groups (weight-decay exclusion, layer-wise lr decay), AdamW and LARS.

Groups carry ``lr_scale`` (layer decay factor); the schedule sets ``lr = lr_t * lr_scale``.
"""
from __future__ import annotations

from typing import Iterable, List

import torch
import torch.nn as nn

from ..config import ConfigError


def param_groups(model: nn.Module, weight_decay: float, *, no_weight_decay_list: Iterable[str] = (),
                 layer_decay: float = 1.0) -> List[dict]:
    """Split trainable parameters into decay / no-decay groups, optionally per layer.

    No weight decay for tensors with ndim <= 1, names ending in ``.bias``, and names in
    ``no_weight_decay_list`` (timm's ``param_groups_weight_decay`` rule). With ``layer_decay < 1`` each group
    gets ``lr_scale = layer_decay ** (num_layers - layer_id)``, with the model's ``layer_id`` and ``num_layers``
    (= depth + 1; :mod:`usp_scale.models.contract`: embeddings 0, block i -> i + 1, head/norm depth + 1).
    """
    skip = set(no_weight_decay_list)
    use_layers = layer_decay != 1.0
    if use_layers and not (hasattr(model, "layer_id") and hasattr(model, "num_layers")):
        raise ConfigError(f"optim.layer_decay={layer_decay}: {type(model).__name__} has no layer_id()/num_layers "
                          "(the model contract, usp_scale/models/contract.py)")
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        wd = 0.0 if no_decay else weight_decay
        if use_layers:
            lid = int(model.layer_id(name))
            key = (lid, no_decay)
            scale = layer_decay ** (model.num_layers - lid)
        else:
            key = (0, no_decay)
            scale = 1.0
        g = groups.setdefault(key, {"params": [], "param_names": [], "weight_decay": wd, "lr_scale": scale})
        g["params"].append(p)
        g["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def model_param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> List[dict]:
    """:func:`param_groups` with the model's own ``no_weight_decay()`` (as timm's optimizer factory reads it).
    For the recipes this is exactly the official grouping: MAE and DiT exclude nothing more (cls and mask tokens
    are decayed), the ViT classifier also excludes ``pos_embed`` and ``cls_token``."""
    own = getattr(model, "no_weight_decay", None)
    return param_groups(model, weight_decay, no_weight_decay_list=own() if own is not None else (),
                        layer_decay=layer_decay)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used for MAE linear probing.

    For parameters with ndim > 1: d = g + wd*p; d *= trust * ||p|| / ||d|| (when both norms > 0);
    mu = momentum*mu + d; p -= lr*mu. Parameters with ndim <= 1 get neither decay nor scaling.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    pn, dn = torch.norm(p), torch.norm(d)
                    one = torch.ones_like(pn)
                    q = torch.where(pn > 0, torch.where(dn > 0, g["trust_coefficient"] * pn / dn, one), one)
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])
        return loss


def build_optimizer(optim_cfg, groups: List[dict], device: torch.device) -> torch.optim.Optimizer:
    """AdamW (torch fused where supported, apex when asked) or LARS over prepared groups."""
    groups = [{k: v for k, v in g.items() if k != "param_names"} | {"param_names": g.get("param_names", [])}
              for g in groups]
    if optim_cfg.name == "adamw":
        if optim_cfg.apex:
            try:
                from apex.optimizers import FusedAdam  # type: ignore
            except ImportError as e:
                raise ConfigError("optim.apex=true but NVIDIA apex is not importable; set optim.apex=false "
                                  "(torch's fused AdamW is used then)") from e
            return FusedAdam(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
                             adam_w_mode=True)
        # torch's fused AdamW runs on CUDA and on the CPU (and skips non-finite steps on the device, see
        # Engine.skips_on_device); elsewhere the foreach implementation.
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        fused = bool(optim_cfg.fused) and device.type in _get_fused_kernels_supported_devices()
        return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                                 eps=optim_cfg.eps, fused=fused or None)
    if optim_cfg.name == "lars":
        return LARS(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                    trust_coefficient=optim_cfg.trust_coefficient)
    raise ConfigError(f"optim.name={optim_cfg.name!r}: use 'adamw' or 'lars'")
