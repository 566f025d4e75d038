"""MAE masked reconstruction loss on latents with the norm-pix target, never materialising the target.

loss = sum_{n,l} m[n,l] * mean_j (pred[n,l,j] - t~[n,l,j])^2 / sum m, where t = patchify(latents) is read
straight from the (N, C, H, W) latents and t~ is t standardised per patch (unbiased variance, eps 1e-6),
per image (mean/variance over all of latents[n], computed inside the same kernel), or not at all.

Forward, two launches: the main kernel writes per-program partial sums (sum m * mse, sum m) and, when
pred needs a gradient, the unscaled gradient u = (pred - t~) * m * 2/P in fp32; a one-program kernel
reduces the partials in a fixed order (deterministic, no atomics) and writes the loss in its dtype.
Backward, one launch: grad_pred = u * grad_loss / sum m (no second read of pred or of the latents, no
recomputation of the target). Rows with m == 0 skip their loads. Eager calls launch the kernels directly;
under torch.compile they are opaque custom ops (see ``_common.opaque_op``).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import check, interpreting, next_pow2, num_warps_for, opaque_op, promote, rows_per_program

EPS = 1e-6


@triton.jit
def _masked_loss_kernel(
    pred_ptr,    # (N, L, P) prediction, P = PATCH*PATCH*C in (pi, qi, c) order
    lat_ptr,     # (N, C, H, W) latents (the target, patchified on the fly)
    mask_ptr,    # (N, L) token weights (1 = removed token, counted)
    part_ptr,    # (N * n_lblocks, 2) fp32 partials (sum m * mse, sum m)
    u_ptr,       # (N, L, P) fp32 unscaled grad of pred, written with WRITE_GRAD
    L, H, W, GW, eps,
    C: tl.constexpr, PATCH: tl.constexpr, P: tl.constexpr,
    NORM: tl.constexpr, PER_IMAGE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
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
    img = lat_ptr + n * C * H * W
    t = tl.load(img + c[None, :] * H * W + hh * W + ww, mask=valid, other=0.0).to(tl.float32)
    pred_off = (n * L + l[:, None]) * P + j[None, :]
    x = tl.load(pred_ptr + pred_off, mask=valid, other=0.0).to(tl.float32)
    if NORM:
        if PER_IMAGE:
            # mean and unbiased variance of the whole image latents[n] (two passes, fp32)
            S = C * H * W
            s = tl.arange(0, BLOCK_S)
            acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
            for s0 in range(0, S, BLOCK_S):
                acc += tl.load(img + s0 + s, mask=s0 + s < S, other=0.0).to(tl.float32)
            mu = tl.sum(acc, axis=0) / S
            acc2 = tl.zeros((BLOCK_S,), dtype=tl.float32)
            for s0 in range(0, S, BLOCK_S):
                v = tl.load(img + s0 + s, mask=s0 + s < S, other=0.0).to(tl.float32)
                dv = tl.where(s0 + s < S, v - mu, 0.0)
                acc2 += dv * dv
            rs = 1.0 / tl.sqrt(tl.sum(acc2, axis=0) / (S - 1) + eps)
            t = tl.where(valid, (t - mu) * rs, 0.0)
        else:
            mu = tl.sum(t, axis=1) / P                                  # (BLOCK_L,)
            dt = tl.where(valid, t - mu[:, None], 0.0)
            var = tl.sum(dt * dt, axis=1) / (P - 1)
            t = dt / tl.sqrt(var + eps)[:, None]
    err = tl.where(valid, x - t, 0.0)                                   # (BLOCK_L, BLOCK_P)
    if WRITE_GRAD:
        u = err * (m * (2.0 / P))[:, None]
        tl.store(u_ptr + pred_off, u, mask=lmask[:, None] & jmask[None, :])
    row = tl.sum(err * err, axis=1) / P                                 # (BLOCK_L,) per-token mse
    pid = n * tl.num_programs(1) + lb
    tl.store(part_ptr + pid * 2, tl.sum(row * m, axis=0))
    tl.store(part_ptr + pid * 2 + 1, tl.sum(m, axis=0))


@triton.jit
def _loss_finalize_kernel(
    part_ptr,    # (n_parts, 2) fp32 partials
    sums_ptr,    # (2,) fp32 (sum m * mse, sum m), written
    loss_ptr,    # () loss in its output dtype, written
    n_parts,
    BLOCK: tl.constexpr,
):
    i = tl.arange(0, BLOCK)
    num = tl.zeros((BLOCK,), dtype=tl.float32)
    den = tl.zeros((BLOCK,), dtype=tl.float32)
    for s0 in range(0, n_parts, BLOCK):                                 # fixed order: deterministic
        k = s0 + i
        num += tl.load(part_ptr + k * 2, mask=k < n_parts, other=0.0)
        den += tl.load(part_ptr + k * 2 + 1, mask=k < n_parts, other=0.0)
    nsum = tl.sum(num, axis=0)
    dsum = tl.sum(den, axis=0)
    tl.store(sums_ptr, nsum)
    tl.store(sums_ptr + 1, dsum)
    tl.store(loss_ptr, (nsum / dsum).to(loss_ptr.dtype.element_ty))


@triton.jit
def _loss_grad_kernel(
    u_ptr,       # (numel,) fp32 unscaled gradient from the forward
    gl_ptr,      # () grad of the loss
    sums_ptr,    # (2,) fp32; sums[1] = sum m
    out_ptr,     # (numel,) grad of pred, written in pred's dtype
    numel,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    coef = tl.load(gl_ptr).to(tl.float32) / tl.load(sums_ptr + 1)
    u = tl.load(u_ptr + offs, mask=offs < numel, other=0.0)
    tl.store(out_ptr + offs, (u * coef).to(out_ptr.dtype.element_ty), mask=offs < numel)


def _loss_fwd_impl(pred: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor, patch: int, norm: bool,
                   per_image: bool, want_grad: bool, dtype: torch.dtype
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> loss () in ``dtype``, sums (2,) fp32, unscaled grad of pred (N, L, P) fp32 (``(0,)`` without
    ``want_grad``). Inputs contiguous."""
    N, C, H, W = latents.shape
    L = pred.shape[1]
    P = patch * patch * C
    block_p = next_pow2(P)
    block_l = rows_per_program(block_p, L, gpu_elems=2048)
    block_s = min(next_pow2(C * H * W), (1 << 16) if interpreting() else 2048)
    grid = (N, triton.cdiv(L, block_l))
    n_parts = grid[0] * grid[1]
    dev = pred.device
    part = torch.empty(n_parts, 2, device=dev, dtype=torch.float32)
    u = torch.empty((N, L, P) if want_grad else (0,), device=dev, dtype=torch.float32)
    _masked_loss_kernel[grid](pred, latents, mask, part, u if want_grad else part, L, H, W, W // patch, EPS,
                              C=C, PATCH=patch, P=P, NORM=norm, PER_IMAGE=per_image, WRITE_GRAD=want_grad,
                              BLOCK_L=block_l, BLOCK_P=block_p, BLOCK_S=block_s,
                              num_warps=num_warps_for(block_l * block_p))
    sums = torch.empty(2, device=dev, dtype=torch.float32)
    loss = torch.empty((), device=dev, dtype=dtype)
    _loss_finalize_kernel[(1,)](part, sums, loss, n_parts, BLOCK=min(1024, next_pow2(n_parts)), num_warps=4)
    return loss, sums, u


def _loss_fwd_fake(pred, latents, mask, patch, norm, per_image, want_grad, dtype):
    f32 = torch.float32
    return (pred.new_empty((), dtype=dtype), pred.new_empty((2,), dtype=f32),
            pred.new_empty(pred.shape if want_grad else (0,), dtype=f32))


def _loss_bwd_impl(u: torch.Tensor, grad_loss: torch.Tensor, sums: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """u (N, L, P) fp32, grad_loss (), sums (2,) -> grad of pred = u * grad_loss / sums[1] in ``dtype``."""
    out = torch.empty(u.shape, device=u.device, dtype=dtype)
    block = (1 << 16) if interpreting() else 4096
    _loss_grad_kernel[(triton.cdiv(u.numel(), block),)](u, grad_loss, sums, out, u.numel(), BLOCK=block,
                                                        num_warps=8)
    return out


def _loss_bwd_fake(u, grad_loss, sums, dtype):
    return u.new_empty(u.shape, dtype=dtype)


_loss_fwd = opaque_op("masked_loss_fwd", _loss_fwd_impl, _loss_fwd_fake)
_loss_bwd = opaque_op("masked_loss_bwd", _loss_bwd_impl, _loss_bwd_fake)


class MaskedLatentLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, latents, mask, patch, norm_pix, per_image, dtype):
        loss, sums, u = _loss_fwd(pred, latents, mask, patch, norm_pix, per_image, True, dtype)
        ctx.save_for_backward(u, sums)
        ctx.pred_dtype = pred.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        u, sums = ctx.saved_tensors
        return _loss_bwd(u, grad_loss, sums, ctx.pred_dtype), None, None, None, None, None, None


def masked_latent_loss(pred: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor, patch: int,
                       norm_pix: bool = True, per_image: bool = False) -> torch.Tensor:
    """pred (N, L, p*p*C), latents (N, C, H, W), mask (N, L) -> scalar masked norm-pix MSE.
    Gradient for pred only (the latents are the fixed target)."""
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
    grad_on = torch.is_grad_enabled()
    check(not (grad_on and latents.requires_grad),
          "masked_latent_loss (Triton) gives no gradient for latents (the fixed target); detach them or use "
          "kernels=torch")
    if not mask.is_floating_point():
        mask = mask.float()
    dtype = promote(pred, latents, mask)
    pred, latents, mask = pred.contiguous(), latents.contiguous(), mask.contiguous()
    if grad_on and pred.requires_grad:
        return MaskedLatentLoss.apply(pred, latents, mask, patch, bool(norm_pix), bool(per_image), dtype)
    return _loss_fwd(pred, latents, mask, patch, bool(norm_pix), bool(per_image), False, dtype)[0]
