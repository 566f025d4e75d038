"""MAE decoder unshuffle in one pass: visible tokens + mask token -> original order, + position table.

out[n, 0]     = x[n, 0] + pos[0]                        (cls)
out[n, 1 + l] = (x[n, 1 + r] if r < K else mask_token) + pos[1 + l],   r = ids_restore[n, l]

``ids_restore`` must be the inverse of the masking permutation (each row a permutation of 0..L-1, the
kept tokens getting 0..K-1), as :func:`usp_scale.layers.masking.masking_indices` returns. The backward
pass then writes every row of grad_x exactly once (no atomics): each program loops over a chunk of one
sample's rows (next tile prefetched) and keeps the mask-token gradient in registers, so the fp32
partials are (N, chunks, D) (chunks ~ 8 programs per SM / N), reduced by one torch sum. The mask token
is cast to x's dtype inside the forward kernel (no host-side cast launch).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (check, interpreting, next_pow2, num_warps_for, opaque_op, promote, rows_per_program,
                      sm_count)


@triton.jit
def _unshuffle_kernel(
    x_ptr,      # (N, 1 + K, D) decoder tokens, cls first
    mt_ptr,     # (D,) mask token (any float dtype; rounded to x's dtype)
    ids_ptr,    # (N, L) int64 ids_restore
    pos_ptr,    # (1 + L, D) position table (unused without HAS_POS)
    out_ptr,    # (N, 1 + L, D) output
    K, L, D,
    HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)                            # output rows in [0, 1 + L)
    tmask = t < L + 1
    r = tl.load(ids_ptr + n * L + (t - 1), mask=tmask & (t >= 1), other=0)
    src = tl.where(t == 0, 0, r + 1)                                    # row of x for kept tokens
    from_x = tmask & ((t == 0) | (r < K))                               # (BLOCK_T,)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    out_off = (n * (L + 1) + t[:, None]) * D + d[None, :]
    x_off = (n * (K + 1) + src[:, None]) * D + d[None, :]
    xv = tl.load(x_ptr + x_off, mask=from_x[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    # the reference casts the mask token to x's dtype before the concat
    mt = tl.load(mt_ptr + d, mask=dmask, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    v = tl.where(from_x[:, None], xv, mt[None, :])
    if HAS_POS:
        v += tl.load(pos_ptr + t[:, None] * D + d[None, :], mask=tmask[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
    tl.store(out_ptr + out_off, v.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])


@triton.jit
def _unshuffle_bwd_kernel(
    gx_ptr,     # (N, 1 + K, D) grad of x (written: every row exactly once)
    ids_ptr,    # (N, L) int64 ids_restore
    go_ptr,     # (N, 1 + L, D) grad of the output
    part_ptr,   # (N, CHUNKS, D) fp32 partial sums of the mask-token gradient (one row per program)
    K, L, D, ROWS_PER_CHUNK,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Each program walks ROWS_PER_CHUNK output rows of one sample (next tile's loads issued before the
    current tile's stores), routes kept rows to grad_x and sums the mask-token rows in registers."""
    n = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t_start = chunk * ROWS_PER_CHUNK
    t_end = t_start + ROWS_PER_CHUNK
    t = t_start + tl.arange(0, BLOCK_T)
    tmask = (t < L + 1) & (t < t_end)
    g_nx = tl.load(go_ptr + (n * (L + 1) + t[:, None]) * D + d[None, :], mask=tmask[:, None] & dmask[None, :],
                   other=0.0)
    r_nx = tl.load(ids_ptr + n * L + (t - 1), mask=tmask & (t >= 1), other=0)
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = (t < L + 1) & (t < t_end)
        g = g_nx
        r = r_nx
        tn = t + BLOCK_T
        tnmask = (tn < L + 1) & (tn < t_end)
        g_nx = tl.load(go_ptr + (n * (L + 1) + tn[:, None]) * D + d[None, :],
                       mask=tnmask[:, None] & dmask[None, :], other=0.0)
        r_nx = tl.load(ids_ptr + n * L + (tn - 1), mask=tnmask & (tn >= 1), other=0)
        src = tl.where(t == 0, 0, r + 1)
        from_x = tmask & ((t == 0) | (r < K))
        from_mt = tmask & (t >= 1) & (r >= K)
        tl.store(gx_ptr + (n * (K + 1) + src[:, None]) * D + d[None, :], g.to(gx_ptr.dtype.element_ty),
                 mask=from_x[:, None] & dmask[None, :])
        acc += tl.sum(tl.where(from_mt[:, None], g.to(tl.float32), 0.0), axis=0)
    tl.store(part_ptr + (n * tl.num_programs(1) + chunk) * D + d, acc, mask=dmask)


# Tests set (BLOCK_T, chunks) here to run the GPU-style multi-tile backward loop under the interpreter.
BWD_TILING_OVERRIDE: Optional[tuple] = None


def _bwd_tiling(N: int, L: int, D: int, device: torch.device):
    """(rows per chunk, chunks per sample, BLOCK_T, BLOCK_D) over the 1 + L output rows: about 8 programs
    per SM on a GPU, one chunk per tile in the interpreter."""
    block_d = next_pow2(D)
    block_t = rows_per_program(block_d, L + 1)
    if BWD_TILING_OVERRIDE is not None:
        block_t, chunks = BWD_TILING_OVERRIDE
    elif interpreting():
        chunks = triton.cdiv(L + 1, block_t)
    else:
        chunks = max(1, min(triton.cdiv(L + 1, block_t), triton.cdiv(8 * sm_count(device), N)))
    rows = triton.cdiv(triton.cdiv(L + 1, chunks), block_t) * block_t
    return rows, triton.cdiv(L + 1, rows), block_t, block_d


def _grid(N: int, L: int, D: int):
    block_d = next_pow2(D)
    block_t = rows_per_program(block_d, L + 1)
    return (N, triton.cdiv(L + 1, block_t)), block_t, block_d


def _unshuffle_fwd_impl(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                      pos: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    N, K1, D = x.shape
    L = ids_restore.shape[1]
    out = torch.empty(N, L + 1, D, device=x.device, dtype=dtype)
    grid, bt, bd = _grid(N, L, D)
    _unshuffle_kernel[grid](x, mask_token, ids_restore, x if pos is None else pos, out,
                            K1 - 1, L, D, HAS_POS=pos is not None,
                            BLOCK_T=bt, BLOCK_D=bd, num_warps=num_warps_for(bt * bd))
    return out


def _unshuffle_fwd_fake(x, mask_token, ids_restore, pos, dtype):
    return x.new_empty((x.shape[0], ids_restore.shape[1] + 1, x.shape[2]), dtype=dtype)


_unshuffle_fwd_op = opaque_op("unshuffle_fwd", _unshuffle_fwd_impl, _unshuffle_fwd_fake)


def _unshuffle_bwd_impl(grad: torch.Tensor, ids_restore: torch.Tensor, num_visible: int,
                      dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """grad (N, 1 + L, D) contiguous -> grad_x (N, 1 + K, D) in ``dtype``, grad of the mask token (D,) fp32."""
    N, L1, D = grad.shape
    L = L1 - 1
    gx = torch.empty(N, num_visible + 1, D, device=grad.device, dtype=dtype)
    rows, chunks, bt, bd = _bwd_tiling(N, L, D, grad.device)
    part = torch.empty(N * chunks, D, device=grad.device, dtype=torch.float32)
    _unshuffle_bwd_kernel[(N, chunks)](gx, ids_restore, grad, part, num_visible, L, D, rows,
                                       BLOCK_T=bt, BLOCK_D=bd, num_warps=num_warps_for(bt * bd))
    return gx, (part.view(D) if N * chunks == 1 else part.sum(0))


def _unshuffle_bwd_fake(grad, ids_restore, num_visible, dtype):
    N, _, D = grad.shape
    return grad.new_empty((N, num_visible + 1, D), dtype=dtype), grad.new_empty((D,), dtype=torch.float32)


_unshuffle_bwd_op = opaque_op("unshuffle_bwd", _unshuffle_bwd_impl, _unshuffle_bwd_fake)


class Unshuffle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask_token, ids_restore, pos):
        out = _unshuffle_fwd_op(x, mask_token, ids_restore, pos, promote(x, pos))
        ctx.save_for_backward(ids_restore)
        ctx.meta = (x.shape[1] - 1, x.dtype, mask_token.dtype,
                    None if pos is None else pos.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        (ids_restore,) = ctx.saved_tensors
        num_visible, xdtype, mtdtype, pos_dtype = ctx.meta
        grad = grad.contiguous()
        gx, gmt = _unshuffle_bwd_op(grad, ids_restore, num_visible, xdtype)
        gmt = gmt.to(mtdtype) if ctx.needs_input_grad[1] else None          # (D,): input is the flat view
        gpos = None
        if pos_dtype is not None and ctx.needs_input_grad[3]:
            gpos = grad.sum(0, keepdim=True, dtype=torch.float32).to(pos_dtype)
        return gx if ctx.needs_input_grad[0] else None, gmt, None, gpos


def unshuffle(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
              pos: Optional[torch.Tensor]) -> torch.Tensor:
    """x (N, 1 + K, D), mask_token (1, 1, D), ids_restore (N, L), pos (1, 1 + L, D) or None
    -> (N, 1 + L, D) in the original token order."""
    check(x.dim() == 3, f"x must be (N, 1 + K, D), got {tuple(x.shape)}")
    N, K1, D = x.shape
    check(ids_restore.dim() == 2 and ids_restore.shape[0] == N and ids_restore.shape[1] >= K1 - 1,
          f"ids_restore must be ({N}, L >= {K1 - 1}), got {tuple(ids_restore.shape)}")
    L = ids_restore.shape[1]
    check(mask_token.numel() == D, f"mask_token must be (1, 1, {D}), got {tuple(mask_token.shape)}")
    if pos is not None:
        check(pos.numel() == (L + 1) * D, f"pos must be (1, {L + 1}, {D}), got {tuple(pos.shape)}")
        pos = pos.contiguous()
    return Unshuffle.apply(x.contiguous(), mask_token.contiguous().view(-1), ids_restore.contiguous(), pos)
