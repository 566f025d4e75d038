"""Image output: latent decoding to uint8, PNG files, the ADM ``.npz`` and sample grids."""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

ADM_KEY = "arr_0"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (N, 3, H, W) -> uint8 (N, H, W, 3) by clamp(127.5 x + 128, 0, 255) and truncation
    (the ``+128`` makes the truncation round 127.5 x + 127.5), as DiT/SiT's sample_ddp does."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def make_decoder(vae=None, scale: Optional[float] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Model-space latents -> uint8 images (N, H, W, 3).

    Convention: the samplers produce latents in MODEL space, i.e. VAE latent x scale (0.18215 for
    sd-vae-ft-ema). This decoder divides by ``scale`` (default ``vae.scale``) and calls
    ``vae.decode(z / scale)``, which must return images in [-1, 1] (a tensor, or an object with
    ``.sample`` as diffusers' AutoencoderKL returns). ``vae=None`` treats the latents as the
    [-1, 1] images themselves (pixel-space toy models)."""
    if vae is None:
        return lambda z: to_uint8(z)
    if scale is None:
        scale = getattr(vae, "scale", None)
        if scale is None:
            raise ValueError("the VAE has no .scale attribute; pass the latent scale factor (e.g. 0.18215)")
    scale = float(scale)

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        out = vae.decode(z / scale)
        out = getattr(out, "sample", out)
        return to_uint8(out)
    return decode


def png_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"{index:06d}.png")


def write_png(path: str, image: np.ndarray) -> None:
    """Write atomically (temporary file + rename) so an interrupted job never leaves a partial PNG."""
    tmp = path + ".tmp"
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def read_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def write_npz(path: str, images: np.ndarray) -> str:
    """ADM reference format: ``arr_0`` uint8 [N, H, W, 3], uncompressed."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    tmp = path + ".tmp.npz"
    np.savez(tmp, **{ADM_KEY: images})
    os.replace(tmp, path)
    return path


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
