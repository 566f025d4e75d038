"""MAE masked reconstruction loss on latents with the norm-pix target, never materialising the target.

loss = sum_{n,l} m[n,l] * mean_j (pred[n,l,j] - t~[n,l,j])^2 / sum m, where t = patchify(latents) is read
straight from the (N, C, H, W) latents and t~ is t standardised per patch (unbiased variance, eps 1e-6),
per image (mean/variance over all of latents[n], a small torch pre-pass), or not at all.
Forward: one kernel writing per-program partial sums (numerator and mask sum); backward: one kernel
recomputing t~ and writing grad_pred. Rows with m == 0 skip their loads.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check, next_pow2, num_warps_for, promote, rows_per_program

EPS = 1e-6


@triton.jit
def _masked_loss_kernel(
    pred_ptr,    # (N, L, P) prediction, P = PATCH*PATCH*C in (pi, qi, c) order
    lat_ptr,     # (N, C, H, W) latents (the target, patchified on the fly)
    mask_ptr,    # (N, L) token weights (1 = removed token, counted)
    stats_ptr,   # (N, 2) fp32 per-image (mean, 1/sqrt(var + eps)); read only with PER_IMAGE
    part_ptr,    # fwd: (N * n_lblocks, 2) fp32 partials (sum m * mse, sum m)
    coef_ptr,    # bwd: (1,) fp32 grad_loss / sum(m)
    grad_ptr,    # bwd: (N, L, P) grad of pred (written)
    L, H, W, GW, eps,
    C: tl.constexpr, PATCH: tl.constexpr, P: tl.constexpr,
    NORM: tl.constexpr, PER_IMAGE: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    lb = tl.program_id(1)
    l = lb * BLOCK_L + tl.arange(0, BLOCK_L)                            # (BLOCK_L,) token ids
    lmask = l < L
    m = tl.load(mask_ptr + n * L + l, mask=lmask, other=0.0).to(tl.float32)
    live = lmask & (m != 0.0)                                           # rows that count
    j = tl.arange(0, BLOCK_P)
    jmask = j < P
    c = j % C
    qi = (j // C) % PATCH
    pi = j // (C * PATCH)
    hh = (l // GW)[:, None] * PATCH + pi[None, :]                       # (BLOCK_L, BLOCK_P)
    ww = (l % GW)[:, None] * PATCH + qi[None, :]
    valid = live[:, None] & jmask[None, :]
    t = tl.load(lat_ptr + n * C * H * W + c[None, :] * H * W + hh * W + ww, mask=valid, other=0.0)
    t = t.to(tl.float32)
    pred_off = (n * L + l[:, None]) * P + j[None, :]
    x = tl.load(pred_ptr + pred_off, mask=valid, other=0.0).to(tl.float32)
    if NORM:
        if PER_IMAGE:
            mu = tl.load(stats_ptr + n * 2)
            rs = tl.load(stats_ptr + n * 2 + 1)
            t = tl.where(valid, (t - mu) * rs, 0.0)
        else:
            mu = tl.sum(t, axis=1) / P                                  # (BLOCK_L,)
            dt = tl.where(valid, t - mu[:, None], 0.0)
            var = tl.sum(dt * dt, axis=1) / (P - 1)
            t = dt / tl.sqrt(var + eps)[:, None]
    err = tl.where(valid, x - t, 0.0)                                   # (BLOCK_L, BLOCK_P)
    if BACKWARD:
        coef = tl.load(coef_ptr)
        g = err * (m * (2.0 / P) * coef)[:, None]
        tl.store(grad_ptr + pred_off, g.to(grad_ptr.dtype.element_ty), mask=lmask[:, None] & jmask[None, :])
    else:
        row = tl.sum(err * err, axis=1) / P                             # (BLOCK_L,) per-token mse
        pid = n * tl.num_programs(1) + lb
        tl.store(part_ptr + pid * 2, tl.sum(row * m, axis=0))
        tl.store(part_ptr + pid * 2 + 1, tl.sum(m, axis=0))


def _image_stats(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 2) fp32 (mean, 1/sqrt(unbiased var + eps)) over each whole image."""
    var, mean = torch.var_mean(latents.reshape(latents.shape[0], -1).float(), dim=1, correction=1)
    return torch.stack([mean, torch.rsqrt(var + EPS)], dim=1).contiguous()


def _launch(pred, latents, mask, stats, part, coef, grad, patch, norm, per_image, backward):
    N, C, H, W = latents.shape
    L = pred.shape[1]
    P = patch * patch * C
    block_p = next_pow2(P)
    block_l = rows_per_program(block_p, L, gpu_elems=2048)
    grid = (N, triton.cdiv(L, block_l))
    if part is None:
        return grid
    _masked_loss_kernel[grid](pred, latents, mask, stats, part, coef, grad, L, H, W, W // patch, EPS,
                              C=C, PATCH=patch, P=P, NORM=norm, PER_IMAGE=per_image, BACKWARD=backward,
                              BLOCK_L=block_l, BLOCK_P=block_p, num_warps=num_warps_for(block_l * block_p))
    return grid


@torch.library.custom_op("usp_scale_kernels::masked_loss_fwd", mutates_args=())
def _loss_fwd_op(pred: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor, stats: Optional[torch.Tensor],
                 patch: int, norm: bool, per_image: bool) -> torch.Tensor:
    """-> (2,) fp32: (sum of mask * per-token mse, sum of mask)."""
    pred, latents, mask = pred.contiguous(), latents.contiguous(), mask.contiguous()
    grid = _launch(pred, latents, mask, None, None, None, None, patch, norm, per_image, False)
    part = torch.empty(grid[0] * grid[1], 2, device=pred.device, dtype=torch.float32)
    _launch(pred, latents, mask, pred if stats is None else stats, part, part, pred, patch, norm, per_image, False)
    return part.sum(0)


@_loss_fwd_op.register_fake
def _(pred, latents, mask, stats, patch, norm, per_image):
    return pred.new_empty((2,), dtype=torch.float32)


@torch.library.custom_op("usp_scale_kernels::masked_loss_bwd", mutates_args=())
def _loss_bwd_op(pred: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor, stats: Optional[torch.Tensor],
                 coef: torch.Tensor, patch: int, norm: bool, per_image: bool) -> torch.Tensor:
    """coef (1,) fp32 = d loss / d (sum) -> grad of pred."""
    pred, latents, mask = pred.contiguous(), latents.contiguous(), mask.contiguous()
    grad = torch.empty_like(pred)
    coef = coef.float().reshape(1).contiguous()
    _launch(pred, latents, mask, pred if stats is None else stats, coef, coef, grad, patch, norm, per_image, True)
    return grad


@_loss_bwd_op.register_fake
def _(pred, latents, mask, stats, coef, patch, norm, per_image):
    return torch.empty_like(pred)


class MaskedLatentLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, latents, mask, patch, norm_pix, per_image):
        stats = _image_stats(latents) if (norm_pix and per_image) else None
        sums = _loss_fwd_op(pred, latents, mask, stats, patch, norm_pix, per_image)     # (2,)
        ctx.save_for_backward(pred, latents, mask, stats, sums)
        ctx.cfg = (patch, norm_pix, per_image)
        return (sums[0] / sums[1]).to(promote(pred, latents, mask))

    @staticmethod
    def backward(ctx, grad_loss):
        pred, latents, mask, stats, sums = ctx.saved_tensors
        patch, norm_pix, per_image = ctx.cfg
        coef = grad_loss.float() / sums[1]
        grad = _loss_bwd_op(pred, latents, mask, stats, coef, patch, norm_pix, per_image)
        return grad, None, None, None, None, None


def masked_latent_loss(pred: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor, patch: int,
                       norm_pix: bool = True, per_image: bool = False) -> torch.Tensor:
    """pred (N, L, p*p*C), latents (N, C, H, W), mask (N, L) -> scalar masked norm-pix MSE."""
    check(latents.dim() == 4, f"latents must be (N, C, H, W), got {tuple(latents.shape)}")
    N, C, H, W = latents.shape
    check(H % patch == 0 and W % patch == 0, f"latents {H}x{W} not divisible by patch size {patch}")
    L = (H // patch) * (W // patch)
    P = patch * patch * C
    check(tuple(pred.shape) == (N, L, P), f"pred must be ({N}, {L}, {P}) for these latents, got {tuple(pred.shape)}")
    check(tuple(mask.shape) == (N, L), f"mask must be ({N}, {L}), got {tuple(mask.shape)}")
    if per_image and not norm_pix:
        raise ValueError("norm_image (per_image=True) needs norm_pix_loss=True")
    check(not norm_pix or per_image or P > 1, "per-patch normalisation needs at least 2 values per patch")
    if not mask.is_floating_point():
        mask = mask.float()
    return MaskedLatentLoss.apply(pred.contiguous(), latents.contiguous(), mask.contiguous(), patch,
                                  bool(norm_pix), bool(per_image))
