"""One entry point per fusable op, selected by ``impl`` ("torch" or "triton").

Models call these with their ``kernels`` setting resolved by :func:`usp_scale.kernels.dispatch.resolve_impl`. The "torch"
branch is the readable reference (the official computation); the "triton" branch calls the
fused kernels in ``usp_scale.kernels``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import kernels  # importable without triton: each kernel's module (triton) loads when first used
from .adaln import gated_residual as _gated_residual_ref
from .adaln import layernorm_modulate as _ln_mod_ref
from .loss import norm_pix_loss as _loss_ref
from .masking import gather_tokens, unshuffle_with_mask_tokens
from .patch import patchify


def embed_visible_patches(latents: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          pos: torch.Tensor, ids_keep: torch.Tensor, patch: int, impl: str = "torch"):
    """Embed only the kept patches: (N, C, H, W) -> (N, K, D) = patch @ W^T + b + pos[ids_keep].

    ``weight`` is the patch-embed conv weight (D, C, p, p); ``pos`` is (1, L, D) without cls.
    """
    if impl == "triton":
        return kernels.embed_visible_patches(latents, weight, bias, pos, ids_keep, patch)
    patches = gather_tokens(patchify(latents, patch), ids_keep)            # (N, K, p*p*C)
    w = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)             # (D, p*p*C) in (p, q, c)
    x = F.linear(patches, w, bias)
    return x + gather_tokens(pos.expand(latents.shape[0], -1, -1), ids_keep)


def unshuffle(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor,
              impl: str = "torch") -> torch.Tensor:
    """Decoder input (N, 1 + K, D) -> (N, 1 + L, D) with mask tokens, original order, + pos."""
    if impl == "triton":
        return kernels.unshuffle(x, mask_token, ids_restore, pos)
    return unshuffle_with_mask_tokens(x, mask_token, ids_restore, pos)


def masked_latent_loss(pred: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor, patch: int,
                       norm_pix: bool = True, per_image: bool = False, impl: str = "torch") -> torch.Tensor:
    """MAE loss on latents (N, C, H, W) against pred (N, L, p*p*C), masked mean over removed tokens."""
    if impl == "triton":
        return kernels.masked_latent_loss(pred, latents, mask, patch, norm_pix, per_image)
    return _loss_ref(pred, patchify(latents, patch), mask, norm_pix=norm_pix, per_image=per_image)


def layernorm_modulate(x, weight, bias, shift, scale, eps: float = 1e-6, impl: str = "torch"):
    if impl == "triton":
        return kernels.layernorm_modulate(x, weight, bias, shift, scale, eps)
    return _ln_mod_ref(x, weight, bias, shift, scale, eps)


def gated_residual(x, gate, y, impl: str = "torch"):
    if impl == "triton":
        return kernels.gated_residual(x, gate, y)
    return _gated_residual_ref(x, gate, y)
