"""MAE decoder unshuffle in one pass: visible tokens + mask token -> original order, + position table.

out[n, 0]     = x[n, 0] + pos[0]                        (cls)
out[n, 1 + l] = (x[n, 1 + r] if r < K else mask_token) + pos[1 + l],   r = ids_restore[n, l]

``ids_restore`` must be the inverse of the masking permutation (each row a permutation of 0..L-1, the
kept tokens getting 0..K-1), as :func:`usp_scale.layers.masking.masking_indices` returns. The backward
pass then writes every row of grad_x exactly once (no atomics) and reduces the mask-token gradient
from per-program partial sums.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import check, opaque_op, next_pow2, num_warps_for, promote, rows_per_program


@triton.jit
def _unshuffle_kernel(
    x_ptr,      # (N, 1 + K, D) decoder tokens, cls first            | bwd: grad_x (written)
    mt_ptr,     # (D,) mask token (any float dtype; rounded to x's dtype) | bwd: unused
    ids_ptr,    # (N, L) int64 ids_restore
    pos_ptr,    # (1 + L, D) position table (unused without HAS_POS)
    out_ptr,    # (N, 1 + L, D) fwd output                           | bwd: grad_out (read)
    part_ptr,   # bwd: (N * n_tblocks, D) fp32 partial sums of the mask-token gradient
    K, L, D,
    HAS_POS: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)                            # output rows in [0, 1 + L)
    tmask = t < L + 1
    r = tl.load(ids_ptr + n * L + (t - 1), mask=tmask & (t >= 1), other=0)
    src = tl.where(t == 0, 0, r + 1)                                    # row of x for kept tokens
    from_x = tmask & ((t == 0) | (r < K))                               # (BLOCK_T,)
    from_mt = tmask & (t >= 1) & (r >= K)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    out_off = (n * (L + 1) + t[:, None]) * D + d[None, :]
    x_off = (n * (K + 1) + src[:, None]) * D + d[None, :]
    mx = from_x[:, None] & dmask[None, :]
    if BACKWARD:
        g = tl.load(out_ptr + out_off, mask=tmask[:, None] & dmask[None, :], other=0.0)
        tl.store(x_ptr + x_off, g.to(x_ptr.dtype.element_ty), mask=mx)
        gm = tl.where(from_mt[:, None], g.to(tl.float32), 0.0)
        tl.store(part_ptr + (n * tl.num_programs(1) + tb) * D + d, tl.sum(gm, axis=0), mask=dmask)
    else:
        xv = tl.load(x_ptr + x_off, mask=mx, other=0.0).to(tl.float32)
        # the reference casts the mask token to x's dtype before the concat
        mt = tl.load(mt_ptr + d, mask=dmask, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
        v = tl.where(from_x[:, None], xv, mt[None, :])
        if HAS_POS:
            v += tl.load(pos_ptr + t[:, None] * D + d[None, :], mask=tmask[:, None] & dmask[None, :],
                         other=0.0).to(tl.float32)
        tl.store(out_ptr + out_off, v.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])


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
    _unshuffle_kernel[grid](x, mask_token, ids_restore, x if pos is None else pos, out, out,
                            K1 - 1, L, D, HAS_POS=pos is not None, BACKWARD=False,
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
    grid, bt, bd = _grid(N, L, D)
    part = torch.empty(grid[0] * grid[1], D, device=grad.device, dtype=torch.float32)
    _unshuffle_kernel[grid](gx, gx, ids_restore, gx, grad, part, num_visible, L, D, HAS_POS=False,
                            BACKWARD=True, BLOCK_T=bt, BLOCK_D=bd, num_warps=num_warps_for(bt * bd))
    return gx, part.sum(0)


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
