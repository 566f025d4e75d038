"""ODE/SDE integrators over batched states with per-sample time.

``f(x, t, rows)`` takes x (n, ...), t (n,) float32 and ``rows``, a LongTensor of the positions of
these n rows in the full batch (None = all rows in order), and returns dx/dt shaped like x;
``rows`` lets per-sample conditioning (class labels) follow the rows. The adaptive dopri5 keeps a
separate time, step size and error control for every sample, so a sample's trajectory does not
depend on which other samples share its batch (torchdiffeq instead shares one step size over the
whole batch tensor); rows that have reached the end are left out of the calls.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Field = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

# Dormand-Prince 5(4) tableau.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4))


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, ..., 1) in like's dtype."""
    return v.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square: (N, ...) -> (N,) float64."""
    return x.double().pow(2).flatten(1).mean(1).sqrt()


def _initial_step(f: Field, x0: torch.Tensor, t0: torch.Tensor, f0: torch.Tensor,
                  atol: float, rtol: float, order: int = 4) -> torch.Tensor:
    """Hairer's starting step size, per sample (N,) float64."""
    scale = atol + x0.abs() * rtol
    d0, d1 = _rms(x0 / scale), _rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-30))
    x1 = x0 + _bcast(h0, x0) * f0
    f1 = f(x1, (t0 + h0).float(), None)
    d2 = _rms((f1 - f0) / scale) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / dmax.clamp_min(1e-30)) ** (1.0 / (order + 1)))
    return torch.minimum(100 * h0, h1)


@torch.no_grad()
def dopri5(f: Field, x: torch.Tensor, t0: float = 0.0, t1: float = 1.0, atol: float = 1e-6,
           rtol: float = 1e-3, safety: float = 0.9, ifactor: float = 10.0, dfactor: float = 0.2,
           max_steps: int = 10000, stats: Optional[dict] = None) -> torch.Tensor:
    """Integrate dx/dt = f(x, t) from t0 to t1 with adaptive Dormand-Prince 5(4), per-sample steps.

    Error norm: RMS over each sample of err / (atol + rtol * max(|x_n|, |x_{n+1}|)); a step is
    accepted when it is <= 1. ``stats`` (a dict) receives the number of calls and of rejected steps."""
    if t1 <= t0:
        raise ValueError(f"dopri5 integrates forward: t1={t1} must exceed t0={t0}")
    x = x.float().clone()
    N = x.shape[0]
    t = torch.full((N,), float(t0), dtype=torch.float64, device=x.device)
    k1 = f(x, t.float(), None).float()
    h = _initial_step(f, x, t, k1, atol, rtol)
    n_calls, n_rejected, it = 2, 0, 0
    done = torch.zeros(N, dtype=torch.bool, device=x.device)
    while not bool(done.all()):
        it += 1
        if it > max_steps:
            raise RuntimeError(f"dopri5 did not reach t1={t1} in {max_steps} steps (atol={atol}, rtol={rtol}); "
                               "the field may be stiff or noisy (e.g. a low-precision model)")
        idx = (~done).nonzero().squeeze(1)
        xa, ta, ka1 = x[idx], t[idx], k1[idx]
        ha = torch.minimum(h[idx], t1 - ta)  # never step past t1
        hb = _bcast(ha, xa)
        ks = [ka1]
        for i in range(1, 7):
            xi = xa + hb * sum(a * k for a, k in zip(_A[i], ks) if a != 0.0)
            ks.append(f(xi, (ta + _C[i] * ha).float(), idx).float())
            n_calls += 1
        # stage 7 is evaluated at the 5th-order solution (FSAL)
        y5 = xa + hb * sum(b * k for b, k in zip(_B5, ks) if b != 0.0)
        err = hb * sum(e * k for e, k in zip(_E, ks))
        scale = atol + rtol * torch.maximum(xa.abs(), y5.abs())
        err_norm = _rms(err / scale)
        accept = err_norm <= 1.0
        n_rejected += int((~accept).sum())
        factor = torch.where(err_norm == 0, torch.full_like(err_norm, ifactor),
                             (safety * err_norm.clamp_min(1e-30) ** -0.2).clamp(dfactor, ifactor))
        acc_idx = idx[accept]
        x[acc_idx] = y5[accept]
        k1[acc_idx] = ks[6][accept]
        t_new = ta + ha
        t[acc_idx] = t_new[accept]
        h[idx] = ha * factor
        done = done | (t >= t1 - 1e-12)
    if stats is not None:
        stats.update(calls=n_calls, rejected=n_rejected, iterations=it)
    return x


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """LightningDiT's timestep shift of a sampling grid (transport/integrators.py there): s t / (1 + (s - 1) t).
    ``shift`` 0 leaves the grid alone (its default); s < 1 (0.3 in its recipe) crowds the steps toward t = 0,
    the noise end; the ends 0 and 1 stay."""
    if shift < 0:
        raise ValueError(f"timestep shift must be >= 0 (0 = none), got {shift}")
    return t if shift == 0 else shift * t / (1 + (shift - 1) * t)


def time_grid(t0: float, t1: float, steps: int, shift: float = 0.0) -> torch.Tensor:
    """The steps + 1 times of a fixed-step integration (float64): uniform, then :func:`shift_time`."""
    return shift_time(torch.linspace(t0, t1, steps + 1, dtype=torch.float64), shift)


@torch.no_grad()
def heun(f: Field, x: torch.Tensor, t0: float = 0.0, t1: float = 1.0, steps: int = 50,
         shift: float = 0.0) -> torch.Tensor:
    """Fixed-step Heun (explicit trapezoid), 2 calls per step on a uniform grid (``shift``: :func:`time_grid`)."""
    ts = time_grid(t0, t1, steps, shift)
    x = x.float().clone()
    N = x.shape[0]
    for i in range(steps):
        ti, tn = float(ts[i]), float(ts[i + 1])
        h = tn - ti
        d1 = f(x, torch.full((N,), ti, device=x.device), None).float()
        xp = x + h * d1
        d2 = f(xp, torch.full((N,), tn, device=x.device), None).float()
        x = x + 0.5 * h * (d1 + d2)
    return x


@torch.no_grad()
def euler(f: Field, x: torch.Tensor, t0: float = 0.0, t1: float = 1.0, steps: int = 50,
          shift: float = 0.0) -> torch.Tensor:
    """Fixed-step explicit Euler on a uniform grid (1 call per step, at the start of the step; ``shift``:
    :func:`time_grid`). LightningDiT's ``num_sampling_steps`` N is N grid points: ``steps = N - 1`` here."""
    ts = time_grid(t0, t1, steps, shift)
    x = x.float().clone()
    for i in range(steps):
        h = float(ts[i + 1] - ts[i])
        x = x + h * f(x, torch.full((x.shape[0],), float(ts[i]), device=x.device), None).float()
    return x
