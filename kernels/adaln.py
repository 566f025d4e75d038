"""adaLN: fused LayerNorm + modulate ``LN(x)(1 + scale) + shift`` and the gated residual ``x + gate * y``.

Per-sample shift/scale/gate are (N, D) and broadcast over the T tokens of sample n. Programs own a block
of tokens of one sample, so the per-sample vectors are loaded once per program. Parameter gradients
(gamma, beta, shift, scale, gate) are reduced from per-program fp32 partials with one torch sum.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import check, opaque_op, interpreting, next_pow2, num_warps_for, promote, rows_per_program, sm_count


@triton.jit
def _ln_mod_fwd_kernel(
    x_ptr,      # (N, T, D) input
    w_ptr,      # (D,) LayerNorm gamma (unused without HAS_W)
    b_ptr,      # (D,) LayerNorm beta (unused without HAS_B)
    shift_ptr,  # (N, D)
    scale_ptr,  # (N, D)
    y_ptr,      # (N, T, D) output
    mean_ptr,   # (N * T,) fp32 row means (saved for backward)
    rstd_ptr,   # (N * T,) fp32 row 1/sqrt(var + eps)
    T, D, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    m2 = tmask[:, None] & dmask[None, :]
    rows = n * T + t                                                    # (BLOCK_T,)
    off = rows[:, None] * D + d[None, :]
    x = tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(m2, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    u = xc * rstd[:, None]
    if HAS_W:
        u = u * tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        u = u + tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sc = tl.load(scale_ptr + n * D + d, mask=dmask, other=0.0).to(tl.float32)
    sh = tl.load(shift_ptr + n * D + d, mask=dmask, other=0.0).to(tl.float32)
    y = u * (1.0 + sc[None, :]) + sh[None, :]
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m2)
    tl.store(mean_ptr + rows, mean, mask=tmask)
    tl.store(rstd_ptr + rows, rstd, mask=tmask)


@triton.jit
def _ln_mod_bwd_kernel(
    x_ptr,      # (N, T, D) input
    w_ptr,      # (D,) gamma (unused without HAS_W)
    b_ptr,      # (D,) beta (unused without HAS_B)
    scale_ptr,  # (N, D)
    mean_ptr,   # (N * T,) fp32
    rstd_ptr,   # (N * T,) fp32
    dy_ptr,     # (N, T, D) grad of the output
    dx_ptr,     # (N, T, D) grad of x (written)
    pw_ptr,     # (N, CHUNKS, D) fp32 partial grad of gamma
    pb_ptr,     # (N, CHUNKS, D) fp32 partial grad of beta
    psh_ptr,    # (N, CHUNKS, D) fp32 partial grad of shift
    psc_ptr,    # (N, CHUNKS, D) fp32 partial grad of scale
    T, D, ROWS_PER_CHUNK,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    sc1 = 1.0 + tl.load(scale_ptr + n * D + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    acc_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_sh = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_sc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t_start = chunk * ROWS_PER_CHUNK
    for t0 in range(t_start, t_start + ROWS_PER_CHUNK, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = (t < T) & (t < t_start + ROWS_PER_CHUNK)
        m2 = tmask[:, None] & dmask[None, :]
        rows = n * T + t
        off = rows[:, None] * D + d[None, :]
        x = tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off, mask=m2, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=tmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=tmask, other=0.0)
        xhat = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)       # (BLOCK_T, BLOCK_D)
        u = xhat
        if HAS_W:
            u = u * w[None, :]
        if HAS_B:
            u = u + b[None, :]
        acc_sh += tl.sum(dy, axis=0)
        acc_sc += tl.sum(dy * u, axis=0)
        du = dy * sc1[None, :]
        acc_b += tl.sum(du, axis=0)
        acc_w += tl.sum(du * xhat, axis=0)
        dxhat = du
        if HAS_W:
            dxhat = du * w[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / D
        c2 = tl.sum(dxhat, axis=1) / D
        dx = (dxhat - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m2)
    poff = (n * tl.num_programs(1) + chunk) * D + d
    tl.store(psh_ptr + poff, acc_sh, mask=dmask)
    tl.store(psc_ptr + poff, acc_sc, mask=dmask)
    if HAS_W:
        tl.store(pw_ptr + poff, acc_w, mask=dmask)
    if HAS_B:
        tl.store(pb_ptr + poff, acc_b, mask=dmask)


def _fwd_tiling(T: int, D: int):
    block_d = next_pow2(D)
    block_t = rows_per_program(block_d, T)
    return block_t, block_d


# Tests set (BLOCK_T, chunks) here to run the GPU-style multi-tile loop under the interpreter.
BWD_TILING_OVERRIDE: Optional[tuple] = None


def _bwd_tiling(N: int, T: int, D: int, device: torch.device):
    """(rows per chunk, chunks per sample, BLOCK_T, BLOCK_D): enough programs to fill the GPU, and as
    few as possible in the interpreter."""
    block_d = next_pow2(D)
    block_t = rows_per_program(block_d, T, gpu_elems=2048)
    if BWD_TILING_OVERRIDE is not None:
        block_t, chunks = BWD_TILING_OVERRIDE
    elif interpreting():
        chunks = triton.cdiv(T, block_t)
    else:
        # ~4 programs per SM in all; each loops over its rows, accumulating the parameter partials
        chunks = max(1, min(triton.cdiv(T, block_t), triton.cdiv(4 * sm_count(device), N)))
    rows = triton.cdiv(triton.cdiv(T, chunks), block_t) * block_t
    return rows, triton.cdiv(T, rows), block_t, block_d


def _ln_out_dtype(x, weight, bias, shift, scale) -> torch.dtype:
    dt = promote(x, weight, bias, shift, scale)
    if torch.is_autocast_enabled(x.device.type):   # autocast runs layer_norm in fp32
        dt = torch.promote_types(dt, torch.float32)
    return dt


def _ln_mod_fwd_impl(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   shift: torch.Tensor, scale: torch.Tensor, eps: float, dtype: torch.dtype
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> y (N, T, D) in ``dtype``, row mean and rstd (N * T,) fp32."""
    N, T, D = x.shape
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    y = torch.empty(N, T, D, device=x.device, dtype=dtype)
    mean = torch.empty(N * T, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    bt, bd = _fwd_tiling(T, D)
    _ln_mod_fwd_kernel[(N, triton.cdiv(T, bt))](
        x, x if weight is None else weight.contiguous(), x if bias is None else bias.contiguous(), shift, scale,
        y, mean, rstd, T, D, eps, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_T=bt, BLOCK_D=bd,
        num_warps=num_warps_for(bt * bd))
    return y, mean, rstd


def _ln_mod_fwd_fake(x, weight, bias, shift, scale, eps, dtype):
    N, T, _ = x.shape
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty((N * T,), dtype=torch.float32),
            x.new_empty((N * T,), dtype=torch.float32))


_ln_mod_fwd_op = opaque_op("ln_mod_fwd", _ln_mod_fwd_impl, _ln_mod_fwd_fake)


def _ln_mod_bwd_impl(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx (like x), d gamma (D,), d beta (D,) (empty without affine), d shift, d scale (N, D); grads fp32."""
    N, T, D = x.shape
    x, scale, dy = x.contiguous(), scale.contiguous(), dy.contiguous()
    rows, chunks, bt, bd = _bwd_tiling(N, T, D, x.device)
    dx = torch.empty_like(x)
    parts = torch.empty(4, N, chunks, D, device=x.device, dtype=torch.float32)
    _ln_mod_bwd_kernel[(N, chunks)](
        x, x if weight is None else weight.contiguous(), x if bias is None else bias.contiguous(), scale, mean,
        rstd, dy, dx, parts[0], parts[1], parts[2], parts[3], T, D, rows,
        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_T=bt, BLOCK_D=bd,
        num_warps=num_warps_for(bt * bd))
    empty = x.new_empty((0,), dtype=torch.float32)
    gw = parts[0].sum((0, 1)) if weight is not None else empty
    gb = parts[1].sum((0, 1)) if bias is not None else empty.clone()
    return dx, gw, gb, parts[2].sum(1), parts[3].sum(1)


def _ln_mod_bwd_fake(x, weight, bias, scale, mean, rstd, dy):
    N, T, D = x.shape
    f32 = torch.float32
    return (torch.empty_like(x), x.new_empty((D if weight is not None else 0,), dtype=f32),
            x.new_empty((D if bias is not None else 0,), dtype=f32), x.new_empty((N, D), dtype=f32),
            x.new_empty((N, D), dtype=f32))


_ln_mod_bwd_op = opaque_op("ln_mod_bwd", _ln_mod_bwd_impl, _ln_mod_bwd_fake)


class LayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, shift, scale, eps):
        y, mean, rstd = _ln_mod_fwd_op(x, weight, bias, shift, scale, eps,
                                       _ln_out_dtype(x, weight, bias, shift, scale))
        ctx.save_for_backward(x, weight, bias, scale, mean, rstd)
        ctx.dtypes = (shift.dtype, scale.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, scale, mean, rstd = ctx.saved_tensors
        dx, gw, gb, gsh, gsc = _ln_mod_bwd_op(x, weight, bias, scale, mean, rstd, dy)
        gw = gw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        gb = gb.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        gsh = gsh.to(ctx.dtypes[0]) if ctx.needs_input_grad[3] else None
        gsc = gsc.to(ctx.dtypes[1]) if ctx.needs_input_grad[4] else None
        return dx, gw, gb, gsh, gsc, None


def layernorm_modulate(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x (N, T, D), gamma/beta (D,) or None, shift/scale (N, D) -> LN(x) * (1 + scale) + shift."""
    check(x.dim() == 3, f"x must be (N, T, D), got {tuple(x.shape)}")
    N, T, D = x.shape
    for name, v in (("shift", shift), ("scale", scale)):
        check(tuple(v.shape) == (N, D), f"{name} must be ({N}, {D}), got {tuple(v.shape)}")
    for name, v in (("weight", weight), ("bias", bias)):
        if v is not None:
            check(tuple(v.shape) == (D,), f"LayerNorm {name} must be ({D},), got {tuple(v.shape)}")
    return LayerNormModulate.apply(x.contiguous(), weight, bias, shift.contiguous(), scale.contiguous(),
                                   float(eps))


@triton.jit
def _gated_residual_kernel(
    x_ptr,      # (N, T, D) residual stream         | bwd: unused
    gate_ptr,   # (N, D) per-sample gate
    y_ptr,      # (N, T, D) branch output
    out_ptr,    # fwd: (N, T, D) x + gate * y       | bwd: grad of the output (read)
    dy_ptr,     # bwd: (N, T, D) grad of y (written)
    pg_ptr,     # bwd: (N, n_tblocks, D) fp32 partial grad of gate
    T, D,
    BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    m2 = (t < T)[:, None] & dmask[None, :]
    off = (n * T + t)[:, None] * D + d[None, :]
    g = tl.load(gate_ptr + n * D + d, mask=dmask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + off, mask=m2, other=0.0).to(tl.float32)
    if BACKWARD:
        go = tl.load(out_ptr + off, mask=m2, other=0.0).to(tl.float32)
        tl.store(dy_ptr + off, (go * g[None, :]).to(dy_ptr.dtype.element_ty), mask=m2)
        tl.store(pg_ptr + (n * tl.num_programs(1) + tb) * D + d, tl.sum(go * y, axis=0), mask=dmask)
    else:
        x = tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32)
        tl.store(out_ptr + off, (x + g[None, :] * y).to(out_ptr.dtype.element_ty), mask=m2)


def _gated_fwd_impl(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    N, T, D = x.shape
    out = torch.empty(N, T, D, device=x.device, dtype=dtype)
    bt, bd = _fwd_tiling(T, D)
    _gated_residual_kernel[(N, triton.cdiv(T, bt))](x.contiguous(), gate.contiguous(), y.contiguous(), out, out, out,
                                                    T, D, BACKWARD=False, BLOCK_T=bt, BLOCK_D=bd,
                                                    num_warps=num_warps_for(bt * bd))
    return out


def _gated_fwd_fake(x, gate, y, dtype):
    return x.new_empty(x.shape, dtype=dtype)


_gated_fwd_op = opaque_op("gated_residual_fwd", _gated_fwd_impl, _gated_fwd_fake)


def _gated_bwd_impl(grad: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> grad of y (like y), grad of gate (N, D) fp32."""
    N, T, D = y.shape
    grad, gate, y = grad.contiguous(), gate.contiguous(), y.contiguous()
    bt, bd = _fwd_tiling(T, D)
    nb = triton.cdiv(T, bt)
    dy = torch.empty_like(y)
    pg = torch.empty(N, nb, D, device=y.device, dtype=torch.float32)
    _gated_residual_kernel[(N, nb)](y, gate, y, grad, dy, pg, T, D, BACKWARD=True,
                                    BLOCK_T=bt, BLOCK_D=bd, num_warps=num_warps_for(bt * bd))
    return dy, pg.sum(1)


def _gated_bwd_fake(grad, gate, y):
    return torch.empty_like(y), gate.new_empty(gate.shape, dtype=torch.float32)


_gated_bwd_op = opaque_op("gated_residual_bwd", _gated_bwd_impl, _gated_bwd_fake)


class GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        out = _gated_fwd_op(x, gate, y, promote(x, gate, y))
        ctx.save_for_backward(gate, y)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        gate, y = ctx.saved_tensors
        dy, dgate = _gated_bwd_op(grad, gate, y)
        dx = grad if grad.dtype == ctx.x_dtype else grad.to(ctx.x_dtype)
        return dx, dgate.to(gate.dtype), dy


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (N, T, D) + gate (N, D)[:, None] * y (N, T, D)."""
    check(x.dim() == 3 and x.shape == y.shape, f"x and y must both be (N, T, D), got {tuple(x.shape)}, {tuple(y.shape)}")
    N, T, D = x.shape
    check(tuple(gate.shape) == (N, D), f"gate must be ({N}, {D}), got {tuple(gate.shape)}")
    return GatedResidual.apply(x.contiguous(), gate.contiguous(), y.contiguous())
