"""Short names for the VAEs shipped in ``usp_scale/assets/vae/`` (``vae.path=synthetic-f8``).

A shipped VAE is a diffusers AutoencoderKL folder whose ``config.json`` holds its own latent scale factor
(``scaling_factor``: 1 / std of its latents on its training split, as SD's 0.18215 was computed), recorded
again in ``asset.json``. :func:`shipped_scale` gives it for a short name, so the online encoder, the latent-cache
loader and the sampler's decoder all use it when ``vae.scale`` is 0.
"""
from __future__ import annotations

from .. import assets

KIND = "vae"


def shipped() -> list:
    """Names of the shipped VAEs."""
    return assets.names(KIND)


def resolve_vae_path(path: str) -> str:
    """A shipped VAE's folder (hash-checked) for its short name; any other path unchanged."""
    return assets.verified_dir(KIND, path) if assets.is_asset(KIND, path) else path


def shipped_scale(path: str) -> float:
    """The recorded latent scale factor of the shipped VAE named ``path``; 0.0 for any other path."""
    return float(assets.read_meta(KIND, path)["scaling_factor"]) if assets.is_asset(KIND, path) else 0.0
