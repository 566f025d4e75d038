"""DDPM with learned-range variance (DiT's diffusion), as docs/method.md §4.2 states it.

Conventions
-----------
* ``x`` is (N, C, H, W) in the model's latent space; ``t`` is a LongTensor (N,) of *this* object's
  step indices. For a respaced object (:func:`space_timesteps`) the model is called with the
  ORIGINAL 0..999 indices through ``timestep_map``.
* The model is any callable ``model(x, t, **model_kwargs)`` returning (N, C, H, W) (fixed variance)
  or (N, 2C, H, W) with channels [0, C) = eps and [C, 2C) = v (learned range).
* Schedule tables are float64 numpy arrays, cast to float32 when indexed.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional, Sequence

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

ModelFn = Callable[..., torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]

VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")


def linear_beta_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4,
                         beta_end: float = 0.02) -> np.ndarray:
    """Linear betas in float64, scaled as in DDPM so that T=1000 gives 1e-4..0.02."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def _extract(arr: np.ndarray, t: torch.Tensor, ndim: int, cache: Optional[dict] = None) -> torch.Tensor:
    """arr[t] as float32 on t's device, shaped (N, 1, ..., 1) with ``ndim`` dims. ``cache`` keeps the
    float64 table on the device (no host-to-device copy, hence no stream sync, per call)."""
    if cache is None:
        table = torch.from_numpy(arr).to(device=t.device)
    else:
        key = (id(arr), t.device)
        table = cache.get(key)
        if table is None:
            table = cache[key] = torch.from_numpy(arr).to(device=t.device)
    return table[t].float().view(-1, *([1] * (ndim - 1)))


class GaussianDiffusion:
    """DDPM forward process, loss (mse + vb) and samplers (ancestral, DDIM)."""

    def __init__(self, betas: np.ndarray, model_var_type: str = "learned_range",
                 timestep_map: Optional[Sequence[int]] = None, base_betas: Optional[np.ndarray] = None):
        if model_var_type not in VAR_TYPES:
            raise ValueError(f"model_var_type={model_var_type!r}; expected one of {VAR_TYPES}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.model_var_type = model_var_type
        self.betas = betas
        self.num_timesteps = len(betas)
        # Original step index of each of our steps (identity unless respaced).
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError("timestep_map must have one entry per step")
        # The unspaced schedule, kept so that respace() can start from it again.
        self.base_betas = betas if base_betas is None else np.asarray(base_betas, dtype=np.float64)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # posterior variance is 0 at t=0: use the t=1 value there before taking the log
        pv1 = self.posterior_variance[1] if self.num_timesteps > 1 else self.betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(pv1, self.posterior_variance[1:]))
        self.log_betas = np.log(betas)
        # fixed_large variance: beta_t, with the posterior variance at t = 0
        self.fixed_large_variance = np.append(self.posterior_variance[1] if self.num_timesteps > 1 else betas[0],
                                              betas[1:])
        self.log_fixed_large_variance = np.log(self.fixed_large_variance)
        self._tables: dict = {}
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    def _ex(self, arr: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return _extract(arr, t, ndim, self._tables)

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar) x_0, (1 - abar) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._ex(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
                + self._ex(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        mean = self._ex(self.posterior_mean_coef1, t, n) * x_start + self._ex(self.posterior_mean_coef2, t, n) * x_t
        return mean, self._ex(self.posterior_variance, t, n), self._ex(self.posterior_log_variance_clipped, t, n)

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (self._ex(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - self._ex(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return ((self._ex(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart)
                / self._ex(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

    # ------------------------------------------------------------------ model
    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Our step indices -> the original indices the model was trained with."""
        key = ("timestep_map", t.device)
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(self.timestep_map).to(t.device)
        return self._tables[key][t]

    def call_model(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor,
                   model_kwargs: Optional[dict] = None) -> torch.Tensor:
        return model(x, self.model_timesteps(t), **(model_kwargs or {}))

    def p_mean_variance(self, model: Optional[ModelFn], x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False, model_kwargs: Optional[dict] = None,
                        model_output: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): mean, variance, log-variance and the x_0 prediction.

        ``model_output`` may be given instead of calling ``model`` (used by the loss)."""
        if model_output is None:
            model_output = self.call_model(model, x, t, model_kwargs)
        model_output = model_output.float()
        C = x.shape[1]
        if self.model_var_type == "learned_range":
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"learned_range needs {2 * C} output channels (eps, v), "
                                 f"got {model_output.shape[1]}; set learn_sigma or use fixed variance")
            eps, v = model_output[:, :C], model_output[:, C:]
            min_log = self._ex(self.posterior_log_variance_clipped, t, x.ndim)
            max_log = self._ex(self.log_betas, t, x.ndim)
            frac = (v + 1.0) / 2.0  # v in [-1, 1] -> interpolation weight
            log_var = frac * max_log + (1.0 - frac) * min_log
            var = torch.exp(log_var)
        else:
            eps = model_output[:, :C]
            if self.model_var_type == "fixed_small":
                var_arr, log_arr = self.posterior_variance, self.posterior_log_variance_clipped
            else:
                var_arr, log_arr = self.fixed_large_variance, self.log_fixed_large_variance
            var = self._ex(var_arr, t, x.ndim).expand_as(x)
            log_var = self._ex(log_arr, t, x.ndim).expand_as(x)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": pred_xstart, "eps": eps}

    # ------------------------------------------------------------------ loss
    def vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor, clip_denoised: bool = False) -> Dict[str, torch.Tensor]:
        """Per-sample variational-bound term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0,
        the discretised decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(None, x_t, t, clip_denoised=clip_denoised, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model: ModelFn, x_start: torch.Tensor, t: torch.Tensor,
                        model_kwargs: Optional[dict] = None, noise: Optional[torch.Tensor] = None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Per-sample losses (N,): ``loss`` = ``mse`` + ``vb`` (vb only with learned variance).

        vb uses the detached eps prediction, so it trains only the variance channels. ``noise`` defaults to a
        standard normal draw from ``generator`` (the global generator when None)."""
        if noise is None:
            noise = torch.randn(x_start.shape, dtype=x_start.dtype, device=x_start.device, generator=generator)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self.call_model(model, x_t, t, model_kwargs)
        C = x_start.shape[1]
        terms = {}
        if self.model_var_type == "learned_range":
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"learned_range needs {2 * C} output channels, got {model_output.shape[1]}")
            eps, v = model_output[:, :C], model_output[:, C:]
            frozen = torch.cat([eps.detach(), v], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)["output"]
        else:
            eps = model_output[:, :C]
        terms["mse"] = mean_flat((noise - eps.float()) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ------------------------------------------------------------------ samplers
    def _steps(self, progress: bool, desc: str) -> Iterable[int]:
        steps = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm
            return tqdm(steps, desc=desc, leave=False)
        return steps

    def p_sample(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
                 model_kwargs: Optional[dict] = None, noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} (no noise where t == 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        if noise is None:
            noise = torch.randn_like(x)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model: ModelFn, shape: Sequence[int], noise: Optional[torch.Tensor] = None,
                      clip_denoised: bool = False, model_kwargs: Optional[dict] = None,
                      device: Optional[torch.device] = None, progress: bool = False,
                      noise_fn: Optional[NoiseFn] = None) -> torch.Tensor:
        """Ancestral sampling from x_T = ``noise`` (or fresh N(0, I)) down to x_0.

        ``noise_fn(x)`` supplies each step's noise (default ``torch.randn_like``); the sharded sampler
        passes a per-sample-generator source so results do not depend on the batch composition."""
        return self._sample_loop(
            shape, noise, device, progress, "ddpm", noise_fn, noisy=lambda i: i > 0,
            step=lambda x, t, z: self.p_sample(model, x, t, clip_denoised, model_kwargs, noise=z)["sample"])

    def _sample_loop(self, shape, noise, device, progress, name, noise_fn, noisy, step) -> torch.Tensor:
        """Shared loop of the samplers: start from ``noise`` (or N(0, I)), then for each kept step i
        (last to first) draw that step's noise when ``noisy(i)`` and apply ``step(x, t, z)``."""
        noise_fn = noise_fn or torch.randn_like
        if noise is None:
            noise = torch.randn(*shape, device=device)
        x = noise.float()
        for i in self._steps(progress, name):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x = step(x, t, noise_fn(x) if noisy(i) else torch.zeros_like(x))
        return x

    def ddim_sample(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
                    model_kwargs: Optional[dict] = None, eta: float = 0.0,
                    noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} with stochasticity ``eta`` (0 = deterministic)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        a_bar = self._ex(self.alphas_cumprod, t, x.ndim)
        a_bar_prev = self._ex(self.alphas_cumprod_prev, t, x.ndim)
        sigma = eta * torch.sqrt((1 - a_bar_prev) / (1 - a_bar)) * torch.sqrt(1 - a_bar / a_bar_prev)
        mean = out["pred_xstart"] * torch.sqrt(a_bar_prev) + torch.sqrt(1 - a_bar_prev - sigma ** 2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        if noise is None:
            noise = torch.randn_like(x)
        return {"sample": mean + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model: ModelFn, shape: Sequence[int], noise: Optional[torch.Tensor] = None,
                         clip_denoised: bool = False, model_kwargs: Optional[dict] = None,
                         device: Optional[torch.device] = None, progress: bool = False, eta: float = 0.0,
                         noise_fn: Optional[NoiseFn] = None) -> torch.Tensor:
        """DDIM sampling over this object's steps (respace first for fewer steps)."""
        return self._sample_loop(
            shape, noise, device, progress, "ddim", noise_fn, noisy=lambda i: eta > 0 and i > 0,
            step=lambda x, t, z: self.ddim_sample(model, x, t, clip_denoised, model_kwargs, eta=eta,
                                                  noise=z)["sample"])

    # ------------------------------------------------------------------ respacing
    def respace(self, section_counts) -> "GaussianDiffusion":
        """A new object on a subset of the ORIGINAL schedule's steps (see :func:`space_timesteps`)."""
        base = GaussianDiffusion(self.base_betas, self.model_var_type)
        use = space_timesteps(base.num_timesteps, section_counts)
        return spaced_diffusion(base, use)


def space_timesteps(num_timesteps: int, section_counts) -> list:
    """Steps kept when respacing, sorted.

    ``section_counts``: an int / "250" (one section), a comma list "10,15,20" (the schedule is cut
    into equal sections, each getting its count), or "ddimN" (a constant integer stride giving N
    steps). In a section of ``size`` steps starting at ``start`` with count ``n`` the kept steps are
    ``start + round(k * (size - 1) / (n - 1))``, k = 0..n-1 (both ends included)."""
    if isinstance(section_counts, str):
        s = section_counts.strip()
        if s.startswith("ddim"):
            want = int(s[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot make exactly {want} steps from {num_timesteps} with an integer stride")
        counts = [int(c) for c in s.split(",") if c.strip()]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError(f"empty respacing {section_counts!r}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, n in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if n < 1 or n > size:
            raise ValueError(f"cannot take {n} steps from a section of {size} steps "
                             f"(respacing {section_counts!r}, {num_timesteps} steps)")
        if n == 1:
            kept.append(start)
        else:
            kept.extend(start + round(k * (size - 1) / (n - 1)) for k in range(n))
        start += size
    return sorted(set(kept))


def spaced_diffusion(base: GaussianDiffusion, use_timesteps: Iterable[int]) -> GaussianDiffusion:
    """Diffusion on the kept steps of ``base``: beta_k = 1 - abar[t_k] / abar[t_{k-1}] (abar before
    the first kept step = 1), so abar at the kept steps is reproduced; the model receives the
    original indices t_k."""
    use = sorted(set(int(i) for i in use_timesteps))
    if not use or use[0] < 0 or use[-1] >= base.num_timesteps:
        raise ValueError(f"kept steps must lie in [0, {base.num_timesteps})")
    last, betas = 1.0, []
    for i in use:
        ac = base.alphas_cumprod[i]
        betas.append(1.0 - ac / last)
        last = ac
    return GaussianDiffusion(np.array(betas), base.model_var_type,
                             timestep_map=base.timestep_map[use], base_betas=base.base_betas)


def create_diffusion(timestep_respacing="", noise_schedule: str = "linear", learn_sigma: bool = True,
                     diffusion_steps: int = 1000, sigma_small: bool = False,
                     respacing=None) -> GaussianDiffusion:
    """DiT's diffusion: linear betas, eps prediction, learned-range variance when ``learn_sigma``.

    ``timestep_respacing`` (alias ``respacing``) "" keeps all ``diffusion_steps`` (training);
    "250" keeps 250 (the sampling default). Without learn_sigma the variance is fixed
    (beta_t, or the posterior variance with ``sigma_small``)."""
    if respacing is not None:
        timestep_respacing = respacing
    if noise_schedule != "linear":
        raise ValueError(f"noise_schedule={noise_schedule!r}: only 'linear' is implemented (DiT's schedule, docs/method.md §4.2)")
    var_type = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    base = GaussianDiffusion(linear_beta_schedule(diffusion_steps), var_type)
    if timestep_respacing in ("", None) or str(timestep_respacing) == str(diffusion_steps):
        return base
    return spaced_diffusion(base, space_timesteps(diffusion_steps, timestep_respacing))
