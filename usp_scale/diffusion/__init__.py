"""DiT's Gaussian diffusion (DDPM, learned-range variance, respacing, DDIM); docs/method.md §4.2."""
from .gaussian import (GaussianDiffusion, create_diffusion, linear_beta_schedule, space_timesteps,
                       spaced_diffusion)
from .losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl

__all__ = ["GaussianDiffusion", "create_diffusion", "linear_beta_schedule", "space_timesteps",
           "spaced_diffusion", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood",
           "mean_flat", "normal_kl"]
