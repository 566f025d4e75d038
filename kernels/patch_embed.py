"""Patch embedding of the kept (visible) tokens only: gather + GEMM + bias + position-embedding add.

Forward, one Triton launch: each program takes BLOCK_M kept tokens (rows of the flattened (N*K) index,
so no padding per sample) and BLOCK_D output features, gathers the tokens' patches from the (N, C, H, W)
latents, multiplies them with the conv weight read in place as (D, C*p*p) (``tl.dot``, fp32 accumulate;
P = C*p*p is padded to a power of two >= 16 and masked), adds the bias, rounds to the compute dtype (as
the reference's linear does) and adds ``pos[ids_keep]``; one write of (N, K, D). Inside the kernel the
reduction axis is in the conv weight's own (c, p, q) order, so the weight is never permuted or copied;
``gather_patches`` still returns the official (p, q, c) order. ids_keep is read with its row stride (the
MAE's ids_keep, a column slice of an argsort, is not copied).

When the weight or bias needs a gradient, the d-block-0 programs also save the gathered patches (N*K,
P [+1]) in the output's dtype, with a column of ones appended when the bias needs a gradient.
Backward: [dW | db]^T = [patches | 1]^T @ grad (one GEMM reads grad once for both, in grad's dtype:
under autocast that is fp32, where the reference first rounds grad to bf16; autograd copies the
transposed dW once into ``.grad``'s layout, db is a contiguous row); dpos by a
deterministic gather kernel: each program owns a block of position rows and loops over the samples in
a fixed order, finding where its tokens sit in ids_keep[n] (ids_keep is a permutation prefix, so at most
once per sample), so no atomics and bit-stable results. The latents gradient (rare: latents usually need
none) is grad @ W scattered back by the gather kernel run in reverse. Eager calls launch directly;
under torch.compile the launches are opaque custom ops (``_common.opaque_op``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import check, compute_dtype, interpreting, next_pow2, num_warps_for, opaque_op, rows_per_program

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _patch_gather_kernel(
    lat_ptr,   # (N, C, H, W) latents, contiguous
    ids_ptr,   # (N, K) int64 kept token indices in [0, L), token = row * GW + col; row stride ID_STRIDE
    pat_ptr,   # (N, K, P) patches, P = PATCH*PATCH*C
    K, H, W, GW, ID_STRIDE,
    C: tl.constexpr, PATCH: tl.constexpr, P: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, SCATTER: tl.constexpr, CONV_ORDER: tl.constexpr,
):
    """SCATTER=False: pat[n, k, :] = patch(lat[n], ids[n, k]); SCATTER=True: the reverse write.
    Value index j = (pi*PATCH + qi)*C + c (official), or c*PATCH*PATCH + pi*PATCH + qi with CONV_ORDER."""
    n = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)             # (BLOCK_K,)
    kmask = k < K
    tok = tl.load(ids_ptr + n * ID_STRIDE + k, mask=kmask, other=0)     # (BLOCK_K,)
    row = tok // GW
    col = tok % GW
    j = tl.arange(0, BLOCK_P)                                           # (BLOCK_P,)
    jmask = j < P
    if CONV_ORDER:
        c = j // (PATCH * PATCH)
        pi = (j // PATCH) % PATCH
        qi = j % PATCH
    else:
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
def _embed_fwd_kernel(
    lat_ptr,   # (N, C, H, W) latents
    ids_ptr,   # (N, K) int64 kept token indices, row stride ID_STRIDE (a slice of argsort output is fine)
    w_ptr,     # (D, C, PATCH, PATCH) conv weight = (D, P) with j = c*PATCH*PATCH + pi*PATCH + qi
    b_ptr,     # (D,) bias (unused without HAS_BIAS)
    pos_ptr,   # (L, D) position table
    out_ptr,   # (N * K, D) output
    pat_ptr,   # (N * K, P1) saved patches (out dtype; column P = 1 with ONES_COL); SAVE_PATCHES only
    M, K, H, W, GW, D, P1, ID_STRIDE,
    C: tl.constexpr, PATCH: tl.constexpr, P: tl.constexpr, CDT: tl.constexpr,
    HAS_BIAS: tl.constexpr, SAVE_PATCHES: tl.constexpr, ONES_COL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    r = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)           # (BLOCK_M,) flat token rows
    rmask = r < M
    n = r // K
    tok = tl.load(ids_ptr + n * ID_STRIDE + (r - n * K), mask=rmask, other=0)
    j = tl.arange(0, BLOCK_P)
    jmask = j < P
    c = j // (PATCH * PATCH)
    pi = (j // PATCH) % PATCH
    qi = j % PATCH
    hh = (tok // GW)[:, None] * PATCH + pi[None, :]                     # (BLOCK_M, BLOCK_P)
    ww = (tok % GW)[:, None] * PATCH + qi[None, :]
    am = rmask[:, None] & jmask[None, :]
    a = tl.load(lat_ptr + n[:, None] * C * H * W + c[None, :] * H * W + hh * W + ww, mask=am, other=0.0)
    a = a.to(CDT)                                                       # the reference's input cast
    if SAVE_PATCHES:
        first = pid_d == 0
        pat_off = r[:, None] * P1 + j[None, :]
        tl.store(pat_ptr + pat_off, a.to(pat_ptr.dtype.element_ty), mask=am & first)
        if ONES_COL:
            tl.store(pat_ptr + r * P1 + P, tl.full((BLOCK_M,), 1.0, tl.float32).to(pat_ptr.dtype.element_ty),
                     mask=rmask & first)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    wt = tl.load(w_ptr + d[None, :] * P + j[:, None], mask=jmask[:, None] & dmask[None, :], other=0.0)
    wt = wt.to(CDT)                                                     # (BLOCK_P, BLOCK_D) = W^T tile
    # products of compute-dtype values are exact in fp32: same result as a bf16 MMA with fp32 accumulate
    acc = tl.dot(a.to(tl.float32), wt.to(tl.float32), input_precision="ieee")   # (BLOCK_M, BLOCK_D)
    if HAS_BIAS:
        acc += tl.load(b_ptr + d, mask=dmask, other=0.0).to(CDT).to(tl.float32)[None, :]
    y = acc.to(CDT).to(tl.float32)                                      # linear output in compute dtype
    om = rmask[:, None] & dmask[None, :]
    y += tl.load(pos_ptr + tok[:, None] * D + d[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(out_ptr + r[:, None] * D + d[None, :], y.to(out_ptr.dtype.element_ty), mask=om)


@triton.jit
def _dpos_kernel(
    g_ptr,     # (N, K, D) grad of the output
    ids_ptr,   # (N, K) int64 kept token indices (each row: distinct tokens), row stride ID_STRIDE
    dpos_ptr,  # (L, D) fp32 grad of the position table, written (every row)
    N, K, L, D, ID_STRIDE,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dpos[t] = sum_n grad[n, k_n(t)] over the samples n that kept token t (k_n(t): its slot)."""
    pid_d = tl.program_id(0)
    pid_t = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)                         # (BLOCK_T,) position rows
    tmask = t < L
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < K
    nn = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):                                     # fixed order: deterministic
        n = (n0 + nn).to(tl.int64)                                      # (BLOCK_N,)
        nmask = n < N
        ids = tl.load(ids_ptr + n[:, None] * ID_STRIDE + kk[None, :], mask=nmask[:, None] & kmask[None, :],
                      other=-1)
        hit = ids[:, None, :] == t[None, :, None]                       # (BLOCK_N, BLOCK_T, BLOCK_K)
        slot = tl.max(tl.where(hit, kk[None, None, :], -1), axis=2)     # (BLOCK_N, BLOCK_T), -1: not kept
        valid = (slot >= 0) & tmask[None, :]
        goff = (n[:, None] * K + slot)[:, :, None] * D + d[None, None, :]
        g = tl.load(g_ptr + goff, mask=valid[:, :, None] & dmask[None, None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32), axis=0)
    tl.store(dpos_ptr + t[:, None] * D + d[None, :], acc, mask=tmask[:, None] & dmask[None, :])


def _launch_gather(lat: torch.Tensor, ids: torch.Tensor, pat: torch.Tensor, patch: int, scatter: bool,
                   conv_order: bool) -> None:
    N, C, H, W = lat.shape
    K = ids.shape[1]
    P = patch * patch * C
    block_p = next_pow2(P)
    block_k = rows_per_program(block_p, K)
    grid = (N, triton.cdiv(K, block_k))
    _patch_gather_kernel[grid](lat, ids, pat, K, H, W, W // patch, ids.stride(0), C=C, PATCH=patch, P=P,
                               BLOCK_K=block_k, BLOCK_P=block_p, SCATTER=scatter, CONV_ORDER=conv_order,
                               num_warps=num_warps_for(block_k * block_p))


def _fwd_tiling(M: int, D: int, P: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_P, BLOCK_D): 16 x 128 output tiles on a GPU (tl.dot needs every dim >= 16; with
    4 warps ptxas gives 72 registers for P = 16 (64 x 128 tiles: 216), so many tiles stay in flight for
    this store-bound kernel); one D-block and as many rows as fit 2^16 elements in the interpreter."""
    block_p = max(16, next_pow2(P))
    if interpreting():
        block_d = max(16, next_pow2(D))
        block_m = max(16, rows_per_program(block_d, M))
    else:
        block_d = max(16, min(128, next_pow2(D)))
        block_m = 16
    return block_m, block_p, block_d


def _fwd_warps(block_m: int, block_d: int) -> int:
    """16 output elements per thread (4 warps for a 16 x 128 tile)."""
    return max(1, min(8, block_m * block_d // 512))


def _dpos_tiling(N: int, K: int, L: int, D: int) -> Tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_T, BLOCK_K, BLOCK_D) with BLOCK_N * BLOCK_T * max(BLOCK_K, BLOCK_D) within budget."""
    block_k = next_pow2(K)
    if interpreting():
        budget, block_d = 1 << 16, next_pow2(D)
        block_t = min(next_pow2(L), max(1, budget // max(block_k, block_d)))
    else:
        budget, block_d = 4096, min(64, next_pow2(D))
        block_t = min(16, next_pow2(L), max(1, budget // max(block_k, block_d)))
    block_n = min(next_pow2(N), max(1, budget // (block_t * max(block_k, block_d))))
    return block_n, block_t, block_k, block_d


def _embed_fwd_impl(latents: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], pos: torch.Tensor,
                    ids_keep: torch.Tensor, patch: int, cdt: torch.dtype, out_dtype: torch.dtype,
                    save: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> out (N, K, D) in ``out_dtype``; patches (N*K, P + save - 1) in ``out_dtype`` when ``save`` is 1
    (weight grad) or 2 (weight and/or bias grad: ones column appended), else ``(0,)``. Inputs contiguous."""
    N, C, H, W = latents.shape
    D = weight.shape[0]
    K = ids_keep.shape[1]
    M, P = N * K, patch * patch * C
    dev = latents.device
    out = torch.empty(N, K, D, device=dev, dtype=out_dtype)
    P1 = P + (1 if save == 2 else 0)
    pat = torch.empty((M, P1) if save else (0,), device=dev, dtype=out_dtype)
    bm, bp, bd = _fwd_tiling(M, D, P)
    grid = (triton.cdiv(D, bd), triton.cdiv(M, bm))
    _embed_fwd_kernel[grid](latents, ids_keep, weight, weight if bias is None else bias, pos, out,
                            pat if save else out, M, K, H, W, W // patch, D, P1, ids_keep.stride(0),
                            C=C, PATCH=patch, P=P, CDT=_TL_DTYPE[cdt], HAS_BIAS=bias is not None,
                            SAVE_PATCHES=bool(save), ONES_COL=save == 2, BLOCK_M=bm, BLOCK_P=bp, BLOCK_D=bd,
                            num_warps=_fwd_warps(bm, bd))
    return out, pat


def _embed_fwd_fake(latents, weight, bias, pos, ids_keep, patch, cdt, out_dtype, save):
    N, C = latents.shape[:2]
    M, P = N * ids_keep.shape[1], patch * patch * C
    out = latents.new_empty((N, ids_keep.shape[1], weight.shape[0]), dtype=out_dtype)
    return out, latents.new_empty((M, P + (1 if save == 2 else 0)) if save else (0,), dtype=out_dtype)


def _dpos_impl(grad: torch.Tensor, ids_keep: torch.Tensor, L: int) -> torch.Tensor:
    """grad (N, K, D), ids_keep (N, K) -> dpos (L, D) fp32, deterministic."""
    N, K, D = grad.shape
    dpos = torch.empty(L, D, device=grad.device, dtype=torch.float32)
    bn, bt, bk, bd = _dpos_tiling(N, K, L, D)
    _dpos_kernel[(triton.cdiv(D, bd), triton.cdiv(L, bt))](grad, ids_keep, dpos, N, K, L, D, ids_keep.stride(0),
                                                           BLOCK_N=bn,
                                                           BLOCK_T=bt, BLOCK_K=bk, BLOCK_D=bd,
                                                           num_warps=num_warps_for(bn * bt * bd))
    return dpos


def _dpos_fake(grad, ids_keep, L):
    return grad.new_empty((L, grad.shape[2]), dtype=torch.float32)


def _gather_impl(latents: torch.Tensor, ids_keep: torch.Tensor, patch: int, dtype: torch.dtype) -> torch.Tensor:
    N, C = latents.shape[:2]
    out = torch.empty(N, ids_keep.shape[1], patch * patch * C, device=latents.device, dtype=dtype)
    _launch_gather(latents, ids_keep, out, patch, scatter=False, conv_order=False)
    return out


def _gather_fake(latents, ids_keep, patch, dtype):
    return latents.new_empty((latents.shape[0], ids_keep.shape[1], patch * patch * latents.shape[1]), dtype=dtype)


def _scatter_impl(grad_patches: torch.Tensor, ids_keep: torch.Tensor, patch: int, shape: List[int],
                  dtype: torch.dtype) -> torch.Tensor:
    """grad_patches (N, K, P) in conv (c, p, q) order -> latents gradient (N, C, H, W), zero elsewhere."""
    glat = torch.zeros(shape, device=grad_patches.device, dtype=dtype)
    _launch_gather(glat, ids_keep, grad_patches, patch, scatter=True, conv_order=True)
    return glat


def _scatter_fake(grad_patches, ids_keep, patch, shape, dtype):
    return grad_patches.new_empty(shape, dtype=dtype)


_embed_fwd = opaque_op("embed_visible_fwd", _embed_fwd_impl, _embed_fwd_fake)
_dpos = opaque_op("embed_visible_dpos", _dpos_impl, _dpos_fake)
_patch_gather = opaque_op("patch_gather", _gather_impl, _gather_fake)
_patch_scatter = opaque_op("patch_scatter", _scatter_impl, _scatter_fake)


def _ids(ids_keep: torch.Tensor) -> torch.Tensor:
    """The kernels read ids with any row stride (MAE's ids_keep is a column slice of an argsort):
    copy only when the tokens of a row are not adjacent."""
    return ids_keep if ids_keep.stride(1) == 1 else ids_keep.contiguous()


def gather_patches(latents: torch.Tensor, ids_keep: torch.Tensor, patch: int,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(N, C, H, W), ids (N, K) -> kept patches (N, K, p*p*C) in (p, q, c) order (no autograd)."""
    return _patch_gather(latents.contiguous(), _ids(ids_keep), patch, dtype or latents.dtype)


class EmbedVisiblePatches(torch.autograd.Function):
    @staticmethod
    def forward(ctx, latents, weight, bias, pos, ids_keep, patch, cdt, out_dtype):
        need_w, need_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        save = 2 if need_b else (1 if need_w else 0)
        out, pat = _embed_fwd(latents, weight, bias, pos, ids_keep, patch, cdt, out_dtype, save)
        ctx.save_for_backward(pat, ids_keep, weight if ctx.needs_input_grad[0] else None)
        ctx.meta = (patch, cdt, tuple(weight.shape), weight.dtype, None if bias is None else bias.dtype,
                    tuple(latents.shape), latents.dtype, tuple(pos.shape), pos.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        pat, ids_keep, weight = ctx.saved_tensors
        patch, cdt, wshape, wdtype, bdtype, lshape, ldtype, pshape, pdtype = ctx.meta
        D, C, p, _ = wshape
        P = C * p * p
        N, K, _ = grad.shape
        grad = grad.contiguous()
        g2 = grad.view(N * K, D)                                                        # (N*K, D)
        gw = gb = glat = gpos = None
        if ctx.needs_input_grad[1] or (bdtype is not None and ctx.needs_input_grad[2]):
            # [dW | db]^T = [patches | 1]^T @ grad: db is then a contiguous row (autograd keeps it as is);
            # dW^T's transpose is viewed in the conv layout (autograd copies it once into .grad's layout)
            gwb_t = pat.t() @ g2                                                        # (P [+ 1], D)
            if ctx.needs_input_grad[1]:
                gw = gwb_t[:P].t().view(D, C, p, p).to(wdtype)                          # conv order already
            if bdtype is not None and ctx.needs_input_grad[2]:
                gb = gwb_t[P].to(bdtype)
        if ctx.needs_input_grad[3]:
            gpos = _dpos(grad, ids_keep, pshape[1]).view(pshape).to(pdtype)
        if ctx.needs_input_grad[0]:
            gpat = (g2.to(cdt) @ weight.reshape(D, P).to(cdt)).view(N, K, P)            # conv order
            glat = _patch_scatter(gpat, ids_keep, patch, list(lshape), ldtype)
        return glat, gw, gb, gpos, None, None, None, None


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
    cdt = compute_dtype(latents.device, latents.dtype, weight.dtype)
    check(cdt in _TL_DTYPE, f"embed_visible_patches supports fp32/bf16/fp16, got {cdt}")
    out_dtype = torch.promote_types(cdt, pos.dtype)
    args = (latents.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            pos.contiguous(), _ids(ids_keep), patch, cdt, out_dtype)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:4]):
        return EmbedVisiblePatches.apply(*args)
    return _embed_fwd(*args, 0)[0]
