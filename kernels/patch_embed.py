"""Patch embedding of the kept (visible) tokens only: gather + GEMM + position-embedding gather-add.

Forward: a Triton kernel gathers the kept patches of the latents straight into (N, K, p*p*C) in the
official (h, w, p, q, c) order (no full patchify), torch ``addmm`` does the GEMM with the conv weight
viewed as (D, p*p*C), and a second kernel adds ``pos[ids_keep]``. Backward: the GEMM gradients in torch
and, when the latents need a gradient, a scatter kernel (ids_keep is a permutation prefix, so every
latent element gets at most one write). The launches are torch.library custom ops, so torch.compile
keeps them as opaque calls.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._common import check, compute_dtype, next_pow2, num_warps_for, rows_per_program


@triton.jit
def _patch_gather_kernel(
    lat_ptr,   # (N, C, H, W) latents, contiguous
    ids_ptr,   # (N, K) int64 kept token indices in [0, L), token = row * GW + col
    pat_ptr,   # (N, K, P) patches, P = PATCH*PATCH*C, value index (pi*PATCH + qi)*C + c
    K, H, W, GW,
    C: tl.constexpr, PATCH: tl.constexpr, P: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, SCATTER: tl.constexpr,
):
    """SCATTER=False: pat[n, k, :] = patch(lat[n], ids[n, k]); SCATTER=True: the reverse write."""
    n = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)             # (BLOCK_K,)
    kmask = k < K
    tok = tl.load(ids_ptr + n * K + k, mask=kmask, other=0)             # (BLOCK_K,)
    row = tok // GW
    col = tok % GW
    j = tl.arange(0, BLOCK_P)                                           # (BLOCK_P,)
    jmask = j < P
    c = j % C
    qi = (j // C) % PATCH
    pi = j // (C * PATCH)
    hh = row[:, None] * PATCH + pi[None, :]                             # (BLOCK_K, BLOCK_P)
    ww = col[:, None] * PATCH + qi[None, :]
    lat_off = n * C * H * W + c[None, :] * H * W + hh * W + ww
    pat_off = (n * K + k[:, None]) * P + j[None, :]
    m = kmask[:, None] & jmask[None, :]
    if SCATTER:
        v = tl.load(pat_ptr + pat_off, mask=m, other=0.0)
        tl.store(lat_ptr + lat_off, v.to(lat_ptr.dtype.element_ty), mask=m)
    else:
        v = tl.load(lat_ptr + lat_off, mask=m, other=0.0)
        tl.store(pat_ptr + pat_off, v.to(pat_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pos_gather_add_kernel(
    y_ptr,     # (N, K, D) GEMM output (patch @ W^T + b)
    pos_ptr,   # (L, D) position table (the (1, L, D) parameter without its batch axis)
    ids_ptr,   # (N, K) int64 kept token indices
    out_ptr,   # (N, K, D) y + pos[ids]; may alias y
    K, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)             # (BLOCK_K,)
    kmask = k < K
    tok = tl.load(ids_ptr + n * K + k, mask=kmask, other=0)
    d = tl.arange(0, BLOCK_D)
    m = kmask[:, None] & (d < D)[None, :]
    off = (n * K + k[:, None]) * D + d[None, :]
    y = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
    p = tl.load(pos_ptr + tok[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, (y + p).to(out_ptr.dtype.element_ty), mask=m)


def _launch_gather(lat: torch.Tensor, ids: torch.Tensor, pat: torch.Tensor, patch: int, scatter: bool) -> None:
    N, C, H, W = lat.shape
    K = ids.shape[1]
    P = patch * patch * C
    block_p = next_pow2(P)
    block_k = rows_per_program(block_p, K)
    grid = (N, triton.cdiv(K, block_k))
    _patch_gather_kernel[grid](lat, ids, pat, K, H, W, W // patch, C=C, PATCH=patch, P=P,
                               BLOCK_K=block_k, BLOCK_P=block_p, SCATTER=scatter,
                               num_warps=num_warps_for(block_k * block_p))


# Custom ops: opaque to torch.compile (it neither traces into nor re-fuses the launches).
@torch.library.custom_op("usp_scale_kernels::patch_gather", mutates_args=())
def _patch_gather_op(latents: torch.Tensor, ids_keep: torch.Tensor, patch: int, dtype: torch.dtype) -> torch.Tensor:
    N, C = latents.shape[:2]
    out = torch.empty(N, ids_keep.shape[1], patch * patch * C, device=latents.device, dtype=dtype)
    _launch_gather(latents.contiguous(), ids_keep.contiguous(), out, patch, scatter=False)
    return out


@_patch_gather_op.register_fake
def _(latents, ids_keep, patch, dtype):
    return latents.new_empty((latents.shape[0], ids_keep.shape[1], patch * patch * latents.shape[1]), dtype=dtype)


@torch.library.custom_op("usp_scale_kernels::patch_scatter", mutates_args=())
def _patch_scatter_op(grad_patches: torch.Tensor, ids_keep: torch.Tensor, patch: int, shape: List[int],
                      dtype: torch.dtype) -> torch.Tensor:
    glat = torch.zeros(shape, device=grad_patches.device, dtype=dtype)
    _launch_gather(glat, ids_keep.contiguous(), grad_patches.contiguous(), patch, scatter=True)
    return glat


@_patch_scatter_op.register_fake
def _(grad_patches, ids_keep, patch, shape, dtype):
    return grad_patches.new_empty(shape, dtype=dtype)


@torch.library.custom_op("usp_scale_kernels::pos_gather_add", mutates_args=())
def _pos_gather_add_op(y: torch.Tensor, pos: torch.Tensor, ids_keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    N, K, D = y.shape
    out = torch.empty(N, K, D, device=y.device, dtype=dtype)
    block_d = next_pow2(D)
    block_k = rows_per_program(block_d, K)
    _pos_gather_add_kernel[(N, triton.cdiv(K, block_k))](
        y.contiguous(), pos.contiguous().reshape(-1, D), ids_keep.contiguous(), out, K, D, BLOCK_K=block_k,
        BLOCK_D=block_d, num_warps=num_warps_for(block_k * block_d))
    return out


@_pos_gather_add_op.register_fake
def _(y, pos, ids_keep, dtype):
    return y.new_empty(y.shape, dtype=dtype)


def gather_patches(latents: torch.Tensor, ids_keep: torch.Tensor, patch: int,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(N, C, H, W), ids (N, K) -> kept patches (N, K, p*p*C) in (p, q, c) order (no autograd)."""
    return _patch_gather_op(latents, ids_keep, patch, dtype or latents.dtype)


class EmbedVisiblePatches(torch.autograd.Function):
    @staticmethod
    def forward(ctx, latents, weight, bias, pos, ids_keep, patch):
        N, C, H, W = latents.shape
        D = weight.shape[0]
        K = ids_keep.shape[1]
        cdt = compute_dtype(latents.device, latents.dtype, weight.dtype)
        patches = _patch_gather_op(latents, ids_keep, patch, cdt)                       # (N, K, P)
        w2d = weight.permute(0, 2, 3, 1).reshape(D, -1).to(cdt)                         # (D, P)
        flat = patches.view(N * K, -1)
        if bias is not None:
            y = torch.addmm(bias.to(cdt), flat, w2d.t())
        else:
            y = flat @ w2d.t()
        out = _pos_gather_add_op(y.view(N, K, D), pos, ids_keep, torch.promote_types(cdt, pos.dtype))
        ctx.save_for_backward(patches, w2d, ids_keep)
        ctx.meta = (patch, tuple(weight.shape), weight.dtype, None if bias is None else bias.dtype,
                    tuple(latents.shape), latents.dtype, tuple(pos.shape), pos.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        patches, w2d, ids_keep = ctx.saved_tensors
        patch, wshape, wdtype, bdtype, lshape, ldtype, pshape, pdtype = ctx.meta
        D, C, p, _ = wshape
        N, K, _ = grad.shape
        g = grad.to(w2d.dtype).reshape(N * K, D)                                       # (N*K, D)
        gw = gb = glat = gpos = None
        if ctx.needs_input_grad[1]:
            gw2d = g.t() @ patches.view(N * K, -1)                                      # (D, P)
            gw = gw2d.view(D, p, p, C).permute(0, 3, 1, 2).contiguous().to(wdtype)
        if ctx.needs_input_grad[2]:
            gb = grad.sum(dim=(0, 1), dtype=torch.float32).to(bdtype)
        if ctx.needs_input_grad[0]:
            gpat = (g @ w2d).view(N, K, -1)                                             # (N, K, P)
            glat = _patch_scatter_op(gpat, ids_keep, patch, list(lshape), ldtype)
        if ctx.needs_input_grad[3]:
            gpos = torch.zeros(pshape[1], D, device=grad.device, dtype=torch.float32)
            gpos = gpos.index_add(0, ids_keep.reshape(-1), grad.reshape(N * K, D).float())
            gpos = gpos.view(pshape).to(pdtype)
        return glat, gw, gb, gpos, None, None


def embed_visible_patches(latents: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          pos: torch.Tensor, ids_keep: torch.Tensor, patch: int) -> torch.Tensor:
    """latents (N, C, H, W), conv weight (D, C, p, p), bias (D,) or None, pos (1, L, D),
    ids_keep (N, K) -> (N, K, D) = patches[ids_keep] @ W^T + b + pos[ids_keep]."""
    check(latents.dim() == 4, f"latents must be (N, C, H, W), got {tuple(latents.shape)}")
    N, C, H, W = latents.shape
    check(H % patch == 0 and W % patch == 0, f"latents {H}x{W} not divisible by patch size {patch}")
    check(weight.dim() == 4 and tuple(weight.shape[1:]) == (C, patch, patch),
          f"weight must be (D, {C}, {patch}, {patch}), got {tuple(weight.shape)}")
    D = weight.shape[0]
    L = (H // patch) * (W // patch)
    check(pos.shape[-2:] == (L, D) and pos.numel() == L * D, f"pos must be (1, {L}, {D}), got {tuple(pos.shape)}")
    check(ids_keep.dim() == 2 and ids_keep.shape[0] == N, f"ids_keep must be ({N}, K), got {tuple(ids_keep.shape)}")
    check(bias is None or tuple(bias.shape) == (D,), f"bias must be ({D},)")
    return EmbedVisiblePatches.apply(latents.contiguous(), weight, bias, pos.contiguous(),
                                     ids_keep.contiguous(), patch)
