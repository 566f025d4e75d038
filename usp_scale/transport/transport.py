"""SiT transport (docs/method.md §4.3): linear path, velocity prediction, ODE and SDE samplers.

Time runs from t = 0 (noise x0 ~ N(0, I)) to t = 1 (data x1): x_t = t x1 + (1 - t) x0, target
velocity u = x1 - x0. The model is ``model(x, t, **model_kwargs)`` with float t (N,) in [0, 1]
(no x1000); if it returns 2C channels (SiT with learn_sigma) only the first C are the velocity.

LightningDiT's options (hustvl/LightningDiT transport/): ``time_sampling="logit_normal"`` draws training times
t = sigmoid(n), n ~ N(0, 1) (its ``use_lognorm``); ``cosine_loss=True`` adds 1 - cos(v, u) over the channel axis,
averaged over the positions, to the MSE (its ``use_cosine_loss``; the total it trains on is MSE + cos);
``timestep_shift`` s > 0 moves the fixed-step sampling grid to s t / (1 + (s - 1) t) (integrators.shift_time).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ..diffusion.losses import mean_flat
from . import integrators

TIME_SAMPLING = ("uniform", "logit_normal")

ModelFn = Callable[..., torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def _bt(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def sample_time(n: int, device=None, generator: Optional[torch.Generator] = None, kind: str = "uniform",
                mu: float = 0.0, sigma: float = 1.0) -> torch.Tensor:
    """Training times (n,) float32: ``uniform`` on [0, 1) or ``logit_normal``: sigmoid(mu + sigma * N(0, 1))
    (LightningDiT's ``sample_logit_normal(0, 1)``, with the project's generator instead of NumPy's)."""
    if kind == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, device=device, generator=generator) * sigma + mu)
    raise ValueError(f"time sampling {kind!r}: expected one of {TIME_SAMPLING}")


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample (N,): mean over the positions of 1 - cos(pred, target) along the channel axis (dim 1)."""
    return mean_flat(1 - torch.nn.functional.cosine_similarity(pred, target, dim=1))


class Transport:
    """Linear interpolant with a velocity model (SiT's ``Linear``/``velocity``, train_eps = sample_eps = 0)."""

    def __init__(self, path: str = "linear", prediction: str = "velocity", time_sampling: str = "uniform",
                 cosine_loss: bool = False):
        if path.lower() != "linear" or prediction.lower() != "velocity":
            raise ValueError(f"path={path!r}, prediction={prediction!r}: only the linear path with velocity "
                             "prediction (SiT's training recipe, docs/method.md §4.3) is implemented")
        if time_sampling not in TIME_SAMPLING:
            raise ValueError(f"time_sampling={time_sampling!r}: expected one of {TIME_SAMPLING}")
        self.time_sampling, self.cosine_loss = time_sampling, bool(cosine_loss)

    # ------------------------------------------------------------------ path
    @staticmethod
    def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = t x1 + (1 - t) x0."""
        tb = _bt(t, x1)
        return tb * x1 + (1 - tb) * x0

    @staticmethod
    def velocity_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return x1 - x0

    def training_losses(self, model: ModelFn, x1: torch.Tensor, model_kwargs: Optional[dict] = None,
                        t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Per-sample loss (N,): mean over (C, H, W) of (v - (x1 - x0))^2 with t ~ U[0, 1) (or logit-normal),
        plus the cosine term when ``cosine_loss`` (then ``mse`` and ``cos_loss`` are returned too). ``t`` and
        ``noise`` (x0) default to draws from ``generator`` (the global generator when None), t first."""
        if t is None:
            t = sample_time(x1.shape[0], x1.device, generator, self.time_sampling)
        if noise is None:
            noise = torch.randn(x1.shape, dtype=x1.dtype, device=x1.device, generator=generator)
        x0 = noise
        xt = self.interpolate(x0, x1, t)
        pred = self.velocity(model, xt, t, model_kwargs)
        target = self.velocity_target(x0, x1)
        loss = mean_flat((pred - target) ** 2)
        if not self.cosine_loss:
            return {"loss": loss, "pred": pred}
        cos = cosine_loss(pred, target.float())
        return {"loss": loss + cos, "mse": loss, "cos_loss": cos, "pred": pred}

    # ------------------------------------------------------------------ fields
    @staticmethod
    def velocity(model: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs: Optional[dict] = None
                 ) -> torch.Tensor:
        out = model(x, t, **(model_kwargs or {}))
        return out[:, : x.shape[1]].float()

    @staticmethod
    def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x) = (t v - x) / (1 - t) on the linear path (undefined at t = 1)."""
        tb = _bt(t, x)
        return (tb * v - x) / (1 - tb)

    @staticmethod
    def diffusion_coefficient(t: torch.Tensor) -> torch.Tensor:
        """w(t) = sigma_t = 1 - t (SiT's 'sigma' diffusion form, norm 1)."""
        return 1 - t

    def sde_drift(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs=None) -> torch.Tensor:
        """v + w(t) * score."""
        v = self.velocity(model, x, t, model_kwargs)
        return v + _bt(self.diffusion_coefficient(t), x) * self.score_from_velocity(v, x, t)

    # ------------------------------------------------------------------ samplers
    def sample_ode(self, model: ModelFn, z: torch.Tensor, model_kwargs: Optional[dict] = None,
                   method: str = "dopri5", steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3,
                   stats: Optional[dict] = None, timestep_shift: float = 0.0) -> torch.Tensor:
        """Integrate dx/dt = v(x, t) from t = 0 (z) to 1. ``method``: dopri5 (adaptive; ``steps``
        unused), heun or euler (``steps`` steps on the uniform grid, moved by ``timestep_shift`` > 0)."""
        n = z.shape[0]
        if timestep_shift and method not in ("heun", "euler"):
            raise ValueError(f"timestep_shift={timestep_shift} moves a fixed-step grid (heun, euler); {method} "
                             "chooses its own steps")

        def f(x, t, rows=None):
            kw = model_kwargs or {}
            if rows is not None:  # dopri5 calls with the subset of rows still integrating
                kw = {k: (v[rows] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n else v)
                      for k, v in kw.items()}
            return self.velocity(model, x, t, kw)
        if method == "dopri5":
            return integrators.dopri5(f, z, 0.0, 1.0, atol=atol, rtol=rtol, stats=stats)
        if method == "heun":
            return integrators.heun(f, z, 0.0, 1.0, steps, shift=timestep_shift)
        if method == "euler":
            return integrators.euler(f, z, 0.0, 1.0, steps, shift=timestep_shift)
        raise ValueError(f"ODE method {method!r}: expected dopri5, heun or euler")

    @torch.no_grad()
    def sample_sde(self, model: ModelFn, z: torch.Tensor, model_kwargs: Optional[dict] = None,
                   steps: int = 250, last_step: float = 0.04, noise_fn: Optional[NoiseFn] = None,
                   progress: bool = False) -> torch.Tensor:
        """Euler-Maruyama on linspace(0, 1 - last_step, steps): ``steps - 1`` noisy steps
        x += drift dt + sqrt(2 w(t)) sqrt(dt) xi, then one deterministic step of size ``last_step``
        with the drift at 1 - last_step (``steps`` model calls in all)."""
        if steps < 2:
            raise ValueError("SDE sampling needs steps >= 2")
        if not 0 < last_step < 1:
            raise ValueError(f"last_step={last_step} must lie in (0, 1)")
        noise_fn = noise_fn or torch.randn_like
        grid = torch.linspace(0.0, 1.0 - last_step, steps, dtype=torch.float64)
        x = z.float().clone()
        N = x.shape[0]
        rng = range(steps - 1)
        if progress:
            from tqdm.auto import tqdm
            rng = tqdm(rng, desc="sde", leave=False)
        for i in rng:
            ti, dt = float(grid[i]), float(grid[i + 1] - grid[i])
            t = torch.full((N,), ti, device=x.device)
            drift = self.sde_drift(model, x, t, model_kwargs)
            w = 1.0 - ti
            x = x + drift * dt + (2.0 * w) ** 0.5 * dt ** 0.5 * noise_fn(x)
        t_last = torch.full((N,), float(grid[-1]), device=x.device)
        return x + self.sde_drift(model, x, t_last, model_kwargs) * last_step


def create_transport(path_type: str = "Linear", prediction: str = "velocity", time_sampling: str = "uniform",
                     cosine_loss: bool = False) -> Transport:
    """SiT's ``create_transport`` for the recipe used here (linear path, velocity), with LightningDiT's options
    (``use_lognorm`` -> ``time_sampling="logit_normal"``, ``use_cosine_loss`` -> ``cosine_loss=True``)."""
    return Transport(path_type, prediction, time_sampling=time_sampling, cosine_loss=cosine_loss)
