"""Image output: latent decoding to uint8, PNG files, the ADM ``.npz`` and sample grids."""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from ..fileio import write_with

ADM_KEY = "arr_0"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (N, 3, H, W) -> uint8 (N, H, W, 3) by clamp(127.5 x + 128, 0, 255) and truncation
    (the ``+128`` makes the truncation round 127.5 x + 127.5), as DiT/SiT's sample_ddp does."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _is_raw_autoencoder(vae) -> bool:
    """A bare diffusers model (its decode takes UNscaled latents and returns DecoderOutput)."""
    return type(vae).__module__.startswith("diffusers")


def make_decoder(vae=None, scale: Optional[float] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Model-space latents -> uint8 images (N, H, W, 3).

    The samplers produce latents in MODEL space (VAE latent x scale, 0.18215 for sd-vae-ft-ema).
    * The project's VAE wrapper (:class:`usp_scale.vae.FrozenVAE`, or any object whose ``decode``
      takes model-space latents and returns [-1, 1] images) is called as ``vae.decode(z)``: it
      divides by its own ``.scale``. ``scale`` must then be None or equal to ``vae.scale``.
    * A bare diffusers ``AutoencoderKL`` is called as ``vae.decode(z / scale).sample``; ``scale`` is
      required (or a ``.scale`` attribute set on the module).
    * ``vae=None``: the latents are the [-1, 1] images themselves (pixel-space models)."""
    if vae is None:
        return lambda z: to_uint8(z)
    if _is_raw_autoencoder(vae):
        scale = scale if scale is not None else getattr(vae, "scale", None)
        if scale is None:
            raise ValueError("a bare diffusers AutoencoderKL needs the latent scale factor (e.g. 0.18215): pass "
                             "scale=..., or use usp_scale.vae.FrozenVAE which carries it")
        scale = float(scale)

        @torch.no_grad()
        def decode_raw(z: torch.Tensor) -> torch.Tensor:
            dt = next(vae.parameters()).dtype
            return to_uint8(vae.decode(z.to(dt) / scale).sample)
        return decode_raw
    own = getattr(vae, "scale", None)
    if scale is not None and own is not None and abs(float(scale) - float(own)) > 1e-12:
        raise ValueError(f"the VAE divides by its own scale {own}; got a different scale {scale}")

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        return to_uint8(vae.decode(z))
    return decode


def png_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"{index:06d}.png")


def write_png(path: str, image: np.ndarray) -> None:
    """Write atomically (:func:`usp_scale.fileio.write_with`) so an interrupted job never leaves a partial PNG."""
    write_with(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"), needed=image.nbytes)


def read_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def write_npz(path: str, images: np.ndarray) -> str:
    """ADM reference format: ``arr_0`` uint8 [N, H, W, 3], uncompressed."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, **{ADM_KEY: images})
    return write_with(path, save, needed=images.nbytes)


def read_npz_images(path: str, mmap: bool = False) -> np.ndarray:
    data = np.load(path, mmap_mode="r" if mmap else None)
    if ADM_KEY not in data:
        raise KeyError(f"{path} has no '{ADM_KEY}' array (keys: {list(data.keys())}); "
                       "an ADM image batch stores uint8 [N, H, W, 3] under arr_0")
    return data[ADM_KEY]


def make_grid(images: np.ndarray, nrow: int = 8, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile uint8 [N, H, W, 3] into one [rows*(H+pad)+pad, nrow*(W+pad)+pad, 3] image."""
    n, h, w, c = images.shape
    nrow = max(1, min(nrow, n))
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = images[i]
    return grid
