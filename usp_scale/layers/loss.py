"""MAE's masked reconstruction loss on latents (torch reference)."""
from __future__ import annotations

import torch


def normalize_target(target: torch.Tensor, per_image: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch (last axis) or per-image (last two axes) standardisation, unbiased variance."""
    dims = (-2, -1) if per_image else (-1,)
    mean = target.mean(dim=dims, keepdim=True)
    var = target.var(dim=dims, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token MSE averaged over the patch, then averaged over removed tokens (mask = 1)."""
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def norm_pix_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
                  per_image: bool = False) -> torch.Tensor:
    """pred, target (N, L, P) (target patchified), mask (N, L) -> scalar loss."""
    if norm_pix:
        target = normalize_target(target, per_image=per_image)
    elif per_image:
        raise ValueError("norm_image needs norm_pix_loss")
    return masked_mse(pred, target, mask)
