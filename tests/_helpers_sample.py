"""Toy models with exactly known optimal predictions, for the sampler tests.

Data: every element of x1 is independent N(mu_y, s^2), where mu_y depends on the class label y.
"""
from __future__ import annotations

import numpy as np
import torch


class GaussianVelocity:
    """Exact velocity of SiT's linear path for N(mu_y, s^2) data: v = E[x1 - x0 | x_t]."""

    def __init__(self, mus, s: float, out_channels_factor: int = 1):
        self.mus = torch.as_tensor(mus, dtype=torch.float32)
        self.s = float(s)
        self.factor = out_channels_factor
        self.calls = 0

    def __call__(self, x, t, y):
        self.calls += 1
        mu = self.mus[y.cpu()].to(x.device).view(-1, 1, 1, 1)
        tb = t.float().view(-1, 1, 1, 1)
        var = tb ** 2 * self.s ** 2 + (1 - tb) ** 2
        v = mu + (tb * self.s ** 2 - (1 - tb)) * (x - tb * mu) / var
        return torch.cat([v] * self.factor, dim=1)


class GaussianEps:
    """Exact eps prediction E[eps | x_t] for N(mu_y, s^2) data under the 1000-step linear schedule;
    returns (eps, v) with a constant learned-range value ``v``. ``seen_t`` records the timesteps."""

    def __init__(self, mus, s: float, alphas_cumprod: np.ndarray, v: float = 0.0):
        self.mus = torch.as_tensor(mus, dtype=torch.float32)
        self.s = float(s)
        self.ac = torch.from_numpy(alphas_cumprod)
        self.v = v
        self.seen_t = []

    def __call__(self, x, t, y):
        self.seen_t.append(t.clone())
        mu = self.mus[y.cpu()].view(-1, 1, 1, 1)
        ab = self.ac[t.cpu()].float().view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * self.s ** 2 + 1 - ab)
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1)
