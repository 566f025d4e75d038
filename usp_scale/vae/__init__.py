"""Frozen VAE: :class:`FrozenVAE` (encode images to scaled latents, decode them back)."""
from .frozen import SCALE, FrozenVAE, VAELoadError, fingerprint, load_autoencoder, posterior_latents

__all__ = ["SCALE", "FrozenVAE", "VAELoadError", "fingerprint", "load_autoencoder", "posterior_latents"]
