"""adaLN: fused LayerNorm + modulate ``LN(x)(1 + scale) + shift`` and the gated residual ``x + gate * y``.

Per-sample shift/scale/gate are (N, D) and broadcast over the T tokens of sample n. Programs own a block
of tokens of one sample, so the per-sample vectors are loaded once per program. The backward kernels
loop over a chunk of one sample's rows (about 4 (LN) or 8 (gate) programs per SM), issuing the next
tile's loads before the current tile's math, and write one fp32 partial row per program for the
parameter gradients: (N, chunks, D), reduced by torch (two sums for LN-modulate: gamma/beta together,
shift/scale together, and none for shift/scale when a sample is one chunk; one for the gate). The LN
backward keeps only sum(dy) and sum(dy * xhat) per program and derives the four partials from them.
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
def _ln_mod_bwd_tile_loads(x_ptr, dy_ptr, mean_ptr, rstd_ptr, n, t, T, t_end, d, dmask, D):
    """Loads of one (BLOCK_T, BLOCK_D) backward tile at rows ``t`` of sample ``n`` (masked past T and t_end)."""
    tmask = (t < T) & (t < t_end)
    rows = n * T + t
    m2 = tmask[:, None] & dmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * D + d[None, :], mask=m2, other=0.0)
    dy = tl.load(dy_ptr + rows[:, None] * D + d[None, :], mask=m2, other=0.0)
    mean = tl.load(mean_ptr + rows, mask=tmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=tmask, other=0.0)
    return x, dy, mean, rstd


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
    pw_ptr,     # (N, CHUNKS, D) fp32 partial grad of gamma   } four slices of one (4, N, CHUNKS, D)
    pb_ptr,     # (N, CHUNKS, D) fp32 partial grad of beta    } buffer, reduced by two torch sums
    psh_ptr,    # (N, CHUNKS, D) fp32 partial grad of shift   } (none for shift/scale with one
    psc_ptr,    # (N, CHUNKS, D) fp32 partial grad of scale   }  chunk per sample)
    T, D, ROWS_PER_CHUNK,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    sc1 = 1.0 + tl.load(scale_ptr + n * D + d, mask=dmask, other=0.0).to(tl.float32)
    sw = sc1                                                            # d xhat = dy * (1 + scale) * gamma
    if HAS_W:
        w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        sw = sc1 * w
    # Only two running sums per program (one sample): S1 = sum dy, S2 = sum dy * xhat. The four
    # parameter partials follow after the loop, since shift/scale/gamma/beta are constant per sample:
    # d shift = S1, d scale = gamma S2 + beta S1, d beta = (1 + scale) S1, d gamma = (1 + scale) S2.
    s1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t_start = chunk * ROWS_PER_CHUNK
    t_end = t_start + ROWS_PER_CHUNK
    # Hand-pipelined: the next tile's loads are issued before this tile's math, so two tiles are in
    # flight per program (Triton does not pipeline these loads itself; the loop was latency-bound).
    x_nx, dy_nx, mean_nx, rstd_nx = _ln_mod_bwd_tile_loads(x_ptr, dy_ptr, mean_ptr, rstd_ptr, n,
                                                          t_start + tl.arange(0, BLOCK_T), T, t_end, d, dmask, D)
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = (t < T) & (t < t_end)
        m2 = tmask[:, None] & dmask[None, :]
        off = (n * T + t)[:, None] * D + d[None, :]
        x = x_nx.to(tl.float32)
        dy = dy_nx.to(tl.float32)
        mean = mean_nx
        rstd = rstd_nx
        x_nx, dy_nx, mean_nx, rstd_nx = _ln_mod_bwd_tile_loads(x_ptr, dy_ptr, mean_ptr, rstd_ptr, n, t + BLOCK_T,
                                                              T, t_end, d, dmask, D)
        xhat = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)       # (BLOCK_T, BLOCK_D)
        s1 += tl.sum(dy, axis=0)
        s2 += tl.sum(dy * xhat, axis=0)
        dxhat = dy * sw[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / D
        c2 = tl.sum(dxhat, axis=1) / D
        dx = (dxhat - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m2)
    poff = (n * tl.num_programs(1) + chunk) * D + d
    tl.store(psh_ptr + poff, s1, mask=dmask)
    dsc = s2
    if HAS_W:
        dsc = s2 * w
        tl.store(pw_ptr + poff, sc1 * s2, mask=dmask)
    if HAS_B:
        dsc += s1 * tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        tl.store(pb_ptr + poff, sc1 * s1, mask=dmask)
    tl.store(psc_ptr + poff, dsc, mask=dmask)


def _fwd_tiling(T: int, D: int):
    block_d = next_pow2(D)
    block_t = rows_per_program(block_d, T)
    return block_t, block_d


# Tests set (BLOCK_T, chunks) here to run the GPU-style multi-tile loop under the interpreter.
BWD_TILING_OVERRIDE: Optional[tuple] = None


def _bwd_tiling(N: int, T: int, D: int, device: torch.device, per_sm: int = 4, gpu_elems: int = 2048):
    """(rows per chunk, chunks per sample, BLOCK_T, BLOCK_D): about ``per_sm`` programs per SM, each
    looping over its rows and accumulating the per-sample partials in registers; as few programs as
    possible in the interpreter."""
    block_d = next_pow2(D)
    block_t = rows_per_program(block_d, T, gpu_elems=gpu_elems)
    if BWD_TILING_OVERRIDE is not None:
        block_t, chunks = BWD_TILING_OVERRIDE
    elif interpreting():
        chunks = triton.cdiv(T, block_t)
    else:
        chunks = max(1, min(triton.cdiv(T, block_t), triton.cdiv(per_sm * sm_count(device), N)))
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
    y = torch.empty(N, T, D, device=x.device, dtype=dtype)
    mean = torch.empty(N * T, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    bt, bd = _fwd_tiling(T, D)
    _ln_mod_fwd_kernel[(N, triton.cdiv(T, bt))](
        x, x if weight is None else weight, x if bias is None else bias, shift, scale,
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
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx (like x), [d gamma; d beta] (2, D) fp32 (a row is garbage when its parameter is None),
    [d shift; d scale] (2, N, D) fp32. Inputs contiguous. One sum per pair, none for shift/scale when
    each sample is one chunk."""
    N, T, D = x.shape
    rows, chunks, bt, bd = _bwd_tiling(N, T, D, x.device)
    dx = torch.empty_like(x)
    parts = torch.empty(4, N, chunks, D, device=x.device, dtype=torch.float32)
    _ln_mod_bwd_kernel[(N, chunks)](
        x, x if weight is None else weight, x if bias is None else bias, scale, mean,
        rstd, dy, dx, parts[0], parts[1], parts[2], parts[3], T, D, rows,
        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_T=bt, BLOCK_D=bd,
        num_warps=num_warps_for(bt * bd))
    if weight is not None or bias is not None:
        gwb = parts[:2].sum((1, 2))
    else:
        gwb = x.new_empty((2, 0), dtype=torch.float32)
    gss = parts[2:].view(2, N, D) if chunks == 1 else parts[2:].sum(2)
    return dx, gwb, gss


def _ln_mod_bwd_fake(x, weight, bias, scale, mean, rstd, dy):
    N, T, D = x.shape
    f32 = torch.float32
    return (torch.empty_like(x), x.new_empty((2, D if (weight is not None or bias is not None) else 0), dtype=f32),
            x.new_empty((2, N, D), dtype=f32))


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
        dx, gwb, gss = _ln_mod_bwd_op(x, weight, bias, scale, mean, rstd, dy.contiguous())
        if weight is not None and bias is not None and weight.dtype == bias.dtype:
            gwb = gwb.to(weight.dtype)                      # one cast for both (a no-op in fp32)
        if ctx.dtypes[0] == ctx.dtypes[1]:
            gss = gss.to(ctx.dtypes[0])                     # bf16 shift/scale under autocast: one cast
        gw = gwb[0].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        gb = gwb[1].to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        gsh = gss[0].to(ctx.dtypes[0]) if ctx.needs_input_grad[3] else None
        gsc = gss[1].to(ctx.dtypes[1]) if ctx.needs_input_grad[4] else None
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
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    return LayerNormModulate.apply(x.contiguous(), weight, bias, shift.contiguous(), scale.contiguous(),
                                   float(eps))


@triton.jit
def _gated_residual_kernel(
    x_ptr,      # (N, T, D) residual stream
    gate_ptr,   # (N, D) per-sample gate
    y_ptr,      # (N, T, D) branch output
    out_ptr,    # (N, T, D) x + gate * y
    T, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    m2 = (t < T)[:, None] & dmask[None, :]
    off = (n * T + t)[:, None] * D + d[None, :]
    g = tl.load(gate_ptr + n * D + d, mask=dmask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + off, mask=m2, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, (x + g[None, :] * y).to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _gated_bwd_kernel(
    go_ptr,     # (N, T, D) grad of the output
    gate_ptr,   # (N, D) per-sample gate
    y_ptr,      # (N, T, D) branch output
    dy_ptr,     # (N, T, D) grad of y (written)
    pg_ptr,     # (N, CHUNKS, D) fp32 partial grad of gate (one row per program)
    T, D, ROWS_PER_CHUNK,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Each program loops over ROWS_PER_CHUNK rows of one sample (next tile's loads issued before this
    tile's math) and writes one partial row of d gate: (N, CHUNKS, D) partials, a few MB, instead of one
    row per tile (which at B 256, T 256, D 1152 was as large as the activations)."""
    n = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    g = tl.load(gate_ptr + n * D + d, mask=dmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t_start = chunk * ROWS_PER_CHUNK
    t_end = t_start + ROWS_PER_CHUNK
    t = t_start + tl.arange(0, BLOCK_T)
    m2 = ((t < T) & (t < t_end))[:, None] & dmask[None, :]
    off = (n * T + t)[:, None] * D + d[None, :]
    go_nx = tl.load(go_ptr + off, mask=m2, other=0.0)
    y_nx = tl.load(y_ptr + off, mask=m2, other=0.0)
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m2 = ((t < T) & (t < t_end))[:, None] & dmask[None, :]
        off = (n * T + t)[:, None] * D + d[None, :]
        go = go_nx.to(tl.float32)
        y = y_nx.to(tl.float32)
        tn = t + BLOCK_T
        mn = ((tn < T) & (tn < t_end))[:, None] & dmask[None, :]
        offn = (n * T + tn)[:, None] * D + d[None, :]
        go_nx = tl.load(go_ptr + offn, mask=mn, other=0.0)
        y_nx = tl.load(y_ptr + offn, mask=mn, other=0.0)
        tl.store(dy_ptr + off, (go * g[None, :]).to(dy_ptr.dtype.element_ty), mask=m2)
        acc += tl.sum(go * y, axis=0)
    tl.store(pg_ptr + (n * tl.num_programs(1) + chunk) * D + d, acc, mask=dmask)


def _gated_bwd_tiling(N: int, T: int, D: int, device: torch.device):
    """Lighter per-row work than the LayerNorm backward: two rows per tile, ~8 programs per SM."""
    return _bwd_tiling(N, T, D, device, per_sm=8, gpu_elems=4096)


def _gated_fwd_impl(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inputs contiguous -> x + gate[:, None] * y in ``dtype``."""
    N, T, D = x.shape
    out = torch.empty(N, T, D, device=x.device, dtype=dtype)
    bt, bd = _fwd_tiling(T, D)
    _gated_residual_kernel[(N, triton.cdiv(T, bt))](x, gate, y, out, T, D, BLOCK_T=bt, BLOCK_D=bd,
                                                    num_warps=num_warps_for(bt * bd))
    return out


def _gated_fwd_fake(x, gate, y, dtype):
    return x.new_empty(x.shape, dtype=dtype)


_gated_fwd_op = opaque_op("gated_residual_fwd", _gated_fwd_impl, _gated_fwd_fake)


def _gated_bwd_impl(grad: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs contiguous -> grad of y (like y), grad of gate (N, D) fp32."""
    N, T, D = y.shape
    rows, chunks, bt, bd = _gated_bwd_tiling(N, T, D, y.device)
    dy = torch.empty_like(y)
    pg = torch.empty(N, chunks, D, device=y.device, dtype=torch.float32)
    _gated_bwd_kernel[(N, chunks)](grad, gate, y, dy, pg, T, D, rows, BLOCK_T=bt, BLOCK_D=bd,
                                   num_warps=num_warps_for(bt * bd))
    return dy, (pg.view(N, D) if chunks == 1 else pg.sum(1))


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
        dy, dgate = _gated_bwd_op(grad.contiguous(), gate, y)
        dx = grad if grad.dtype == ctx.x_dtype else grad.to(ctx.x_dtype)
        return dx, dgate.to(gate.dtype), dy


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (N, T, D) + gate (N, D)[:, None] * y (N, T, D)."""
    check(x.dim() == 3 and x.shape == y.shape, f"x and y must both be (N, T, D), got {tuple(x.shape)}, {tuple(y.shape)}")
    N, T, D = x.shape
    check(tuple(gate.shape) == (N, D), f"gate must be ({N}, {D}), got {tuple(gate.shape)}")
    return GatedResidual.apply(x.contiguous(), gate.contiguous(), y.contiguous())
