"""Samplers composed over a model callable ``model(x, t, y)`` (CFG wrapper or plain model).

``build_sampler(kind, process, steps, ...)`` returns a :class:`Sampler`; calling it as
``sampler(model, z, y, noise_fn)`` maps initial noise z (N, C, H, W) to latents in model space.

kinds: ``ddpm`` (ancestral, learned variance, respaced to ``steps``), ``ddim`` (``eta``),
``sde`` (Euler-Maruyama, SiT default), ``ode`` (adaptive dopri5), ``heun`` and ``euler`` (fixed-step ODE).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..diffusion import GaussianDiffusion
from ..transport import Transport

DIFFUSION_KINDS = ("ddpm", "ddim")
TRANSPORT_KINDS = ("sde", "ode", "heun", "euler")
KINDS = DIFFUSION_KINDS + TRANSPORT_KINDS


@dataclass
class Sampler:
    kind: str
    process: object  # GaussianDiffusion (already respaced) or Transport
    steps: int
    options: dict = field(default_factory=dict)

    def __call__(self, model: Callable, z: torch.Tensor, y: torch.Tensor,
                 noise_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 progress: bool = False) -> torch.Tensor:
        kwargs = {"y": y}
        o = self.options
        if self.kind == "ddpm":
            return self.process.p_sample_loop(model, z.shape, noise=z, clip_denoised=False, model_kwargs=kwargs,
                                              progress=progress, noise_fn=noise_fn)
        if self.kind == "ddim":
            return self.process.ddim_sample_loop(model, z.shape, noise=z, clip_denoised=False, model_kwargs=kwargs,
                                                 progress=progress, eta=o.get("eta", 0.0), noise_fn=noise_fn)
        if self.kind == "sde":
            return self.process.sample_sde(model, z, kwargs, steps=self.steps, last_step=o.get("last_step", 0.04),
                                           noise_fn=noise_fn, progress=progress)
        method = "dopri5" if self.kind == "ode" else self.kind
        return self.process.sample_ode(model, z, kwargs, method=method, steps=self.steps,
                                       atol=o.get("atol", 1e-6), rtol=o.get("rtol", 1e-3),
                                       timestep_shift=o.get("timestep_shift", 0.0))

    def describe(self) -> dict:
        d = {"sampler": self.kind, "steps": self.steps if self.kind != "ode" else "adaptive"}
        d.update(self.options)
        return d


def build_sampler(kind: str, process, steps: int = 250, eta: float = 0.0, atol: float = 1e-6,
                  rtol: float = 1e-3, last_step: float = 0.04, timestep_shift: float = 0.0) -> Sampler:
    """Sampler ``kind`` over a :class:`GaussianDiffusion` (ddpm/ddim) or a :class:`Transport` (sde/ode/heun/euler);
    "auto": the process's default, ddpm for a diffusion (DiT), sde for a transport (SiT). ``timestep_shift`` > 0
    (heun/euler only): LightningDiT's shifted grid s t / (1 + (s - 1) t), 0.3 in its recipe; its
    ``num_sampling_steps`` N are N grid points, i.e. ``steps = N - 1`` Euler steps here."""
    kind = kind.lower()
    if kind == "auto":
        kind = "ddpm" if isinstance(process, GaussianDiffusion) else "sde"
    if kind not in KINDS:
        raise ValueError(f"sampler {kind!r}: expected one of {KINDS}")
    if timestep_shift < 0 or (timestep_shift and kind not in ("heun", "euler")):
        raise ValueError(f"timestep_shift={timestep_shift}: a shift >= 0 of the heun/euler grid; sampler {kind!r} "
                         f"takes none")
    if kind in DIFFUSION_KINDS:
        if not isinstance(process, GaussianDiffusion):
            raise TypeError(f"sampler {kind!r} needs a GaussianDiffusion (DiT); got {type(process).__name__}. "
                            f"SiT models use one of {TRANSPORT_KINDS}")
        spaced = process.respace(str(steps)) if steps != process.num_timesteps else process
        opts = {"eta": eta} if kind == "ddim" else {}
        return Sampler(kind, spaced, steps, opts)
    if not isinstance(process, Transport):
        raise TypeError(f"sampler {kind!r} needs a Transport (SiT); got {type(process).__name__}. "
                        f"DiT models use one of {DIFFUSION_KINDS}")
    if kind == "ode":
        opts = {"atol": atol, "rtol": rtol}
    elif kind == "sde":
        opts = {"last_step": last_step}
    else:
        opts = {"timestep_shift": float(timestep_shift)} if timestep_shift else {}
    return Sampler(kind, process, steps, opts)
