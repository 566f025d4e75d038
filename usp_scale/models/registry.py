"""One registry for every model: ``create_model(name, **kwargs)``.

Names are the official ones: ``vit_{base,large,xlarge,huge}_patch_vae`` (+ ``_2`` patch-4
variants) for the masked autoencoder, ``DiT-XL/2``, ``DiT-B/2-VAE-simple``, ``SiT-L/4`` ... for the
diffusion transformers, ``vit_{base,large,xlarge}_patch16_vae`` for the latent classifiers (the
"patch16" is the official misnomer: the patch is 2). ``tiny`` / ``S`` sizes exist for tests; ``tiny`` and ``mini``
are the CPU sizes of the main job and the effect benchmark.
REPA (usp_scale/models/repa.py): ``SiT-{B,L,XL}/2-REPA`` is REPA's SiT; ``SiT-*/2-VAE-simple-REPA`` and (ours)
``DiT-*/2-VAE-simple-REPA`` the project's models with REPA's projector; all return (output, zs).
"""
from __future__ import annotations

import contextlib
import difflib
from functools import partial
from typing import Callable, Dict, List

import torch
import torch.nn as nn

from .dit import DiT, SiT
from .lightning_mae import LightningMAE
from .lightningdit import LightningDiT
from .mae import MaskedAutoencoderViT
from .repa import DiTWithProjectors, REPASiT, SiTWithProjectors
from .vit import VisionTransformer

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}
_FAMILY: Dict[str, str] = {}


def register(name: str, family: str, fn: Callable[..., nn.Module]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    _FAMILY[name] = family


def list_models(family: str = "") -> List[str]:
    return sorted(n for n in _REGISTRY if not family or _FAMILY[n] == family)


def model_family(name: str) -> str:
    """"mae", "dit", "sit", "lightningdit" or "vit"."""
    if name not in _FAMILY:
        raise KeyError(_unknown(name))
    return _FAMILY[name]


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
    return f"unknown model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                         f"; known: {', '.join(list_models())}")


def create_model(name: str, device=None, attn_backend: str = "sdpa", **kwargs) -> nn.Module:
    """Build a registered model. ``device="meta"`` builds it without allocating memory. ``attn_backend``: the
    attention spec its attention modules capture (the job's comes from :func:`usp_scale.runtime.init_runtime`;
    :func:`usp_scale.layers.attention.attention_kernel` lists them)."""
    if name not in _REGISTRY:
        raise KeyError(_unknown(name))
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = _REGISTRY[name](**kwargs)
    model.set_attn_backend(attn_backend)
    return model


# ---------------------------------------------------------------------------- masked autoencoders
# (width, depth, heads); every size uses the 512-wide, 8-deep, 16-head decoder but the CPU sizes (64 wide, 2 deep).
_MAE_SIZES = {
    "tiny": (128, 2, 4),
    "mini": (192, 4, 6),      # the next size up on a CPU (the effect benchmark's sweep, benchmarks/effect/)
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "xlarge": (1152, 28, 16),
    "huge": (1280, 32, 16),
}


_CPU_SIZES = ("tiny", "mini")


def _mae(size: str, patch: int, **kwargs) -> MaskedAutoencoderViT:
    d, depth, heads = _MAE_SIZES[size]
    defaults = dict(img_size=28, in_chans=4, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    if size in _CPU_SIZES:
        defaults.update(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2)
    defaults.update(kwargs)
    return MaskedAutoencoderViT(patch_size=patch, embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=4.0,
                                **defaults)


for _size in _MAE_SIZES:
    register(f"vit_{_size}_patch_vae", "mae", partial(_mae, _size, 2))
for _size in ("tiny", "base", "large"):
    register(f"vit_{_size}_patch_vae_2", "mae", partial(_mae, _size, 4))


# ---------------------------------------------------------------------------- DiT / SiT
_DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def _dit(cls, size: str, patch: int, vae_simple: bool, **kwargs) -> DiT:
    d, depth, heads = _DIT_SIZES[size]
    return cls(patch_size=patch, hidden_size=d, depth=depth, num_heads=heads, vae_simple=vae_simple, **kwargs)


def _dit_tiny(cls, vae_simple: bool, size: str = "tiny", **kwargs) -> DiT:
    d, depth, heads = _MAE_SIZES[size]
    defaults = dict(input_size=8, num_classes=10)
    defaults.update(kwargs)
    return cls(patch_size=2, hidden_size=d, depth=depth, num_heads=heads, vae_simple=vae_simple, **defaults)


for _family, _cls in (("dit", DiT), ("sit", SiT)):
    _prefix = _family.replace("dit", "DiT").replace("sit", "SiT")
    for _size in _DIT_SIZES:
        for _p in (2, 4, 8):
            register(f"{_prefix}-{_size}/{_p}", _family, partial(_dit, _cls, _size, _p, False))
        if _size != "S":
            register(f"{_prefix}-{_size}/2-VAE-simple", _family, partial(_dit, _cls, _size, 2, True))
    # CPU sizes for tests, the CPU demo and the effect benchmark, each the shape of its MAE: tiny (128 wide,
    # 2 deep, 4 heads: vit_tiny_patch_vae), mini (192, 4, 6: vit_mini_patch_vae)
    for _size in _CPU_SIZES:
        register(f"{_prefix}-{_size}/2", _family, partial(_dit_tiny, _cls, False, _size))
        register(f"{_prefix}-{_size}/2-VAE-simple", _family, partial(_dit_tiny, _cls, True, _size))


# ---------------------------------------------------------------------------- REPA (usp_scale/models/repa.py)
def _repa_sit(size: str, **kwargs) -> REPASiT:
    d, depth, heads = _DIT_SIZES[size]
    return REPASiT(patch_size=2, hidden_size=d, depth=depth, num_heads=heads, **kwargs)


# tiny sizes (tests, the CPU miniature): the tap after block 1 of 2, a 256-wide projector onto 64-wide tokens
_REPA_TINY = dict(encoder_depth=1, projector_dim=256, z_dims=(64,))
for _size in ("B", "L", "XL"):
    register(f"SiT-{_size}/2-REPA", "sit", partial(_repa_sit, _size))
register("SiT-tiny/2-REPA", "sit", partial(REPASiT, patch_size=2, hidden_size=128, depth=2, num_heads=4,
                                          input_size=8, num_classes=10, **_REPA_TINY))
for _family, _cls in (("dit", DiTWithProjectors), ("sit", SiTWithProjectors)):
    _prefix = _family.replace("dit", "DiT").replace("sit", "SiT")
    for _size in ("B", "L", "XL"):
        register(f"{_prefix}-{_size}/2-VAE-simple-REPA", _family, partial(_dit, _cls, _size, 2, True))
    register(f"{_prefix}-tiny/2-VAE-simple-REPA", _family, partial(_dit_tiny, _cls, True, **_REPA_TINY))


# ---------------------------------------------------------------------------- classifiers
def _vit(size: str, **kwargs) -> VisionTransformer:
    d, depth, heads = _MAE_SIZES[size]
    defaults = dict(img_size=28, patch_size=2, in_chans=4)
    defaults.update(kwargs)
    return VisionTransformer(embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=4.0, **defaults)


for _size in ("tiny", "mini", "base", "large", "xlarge"):
    register(f"vit_{_size}_patch16_vae", "vit", partial(_vit, _size))


# ---------------------------------------------------------------------------- LightningDiT and its USP MAE
# (width, depth, heads) of hustvl/LightningDiT's sizes (its registry has no L/1; it is registered here too).
_LIGHTNING_SIZES = {"B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16), "1p0B": (1536, 24, 24),
                    "1p6B": (1792, 28, 28)}


def _lightningdit(size: str, patch: int, **kwargs) -> LightningDiT:
    if size == "tiny":  # tests and the CPU chain: 4x4 latents of the synthetic-f16 VAE, 10 classes
        d, depth, heads = 128, 2, 4
        kwargs = dict(dict(input_size=4, num_classes=10), **kwargs)
    else:
        d, depth, heads = _LIGHTNING_SIZES[size]
    return LightningDiT(patch_size=patch, hidden_size=d, depth=depth, num_heads=heads, **kwargs)


def _lightning_mae(size: str, patch: int, **kwargs) -> LightningMAE:
    if size == "tiny":
        d, depth, heads = 128, 2, 4
        kwargs = dict(dict(img_size=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2), **kwargs)
    else:
        d, depth, heads = _LIGHTNING_SIZES[size]
    return LightningMAE(patch_size=patch, embed_dim=d, depth=depth, num_heads=heads, **kwargs)


for _size in _LIGHTNING_SIZES:
    for _p in (1, 2):
        register(f"LightningDiT-{_size}/{_p}", "lightningdit", partial(_lightningdit, _size, _p))
        register(f"LightningMAE-{_size}/{_p}", "mae", partial(_lightning_mae, _size, _p))
register("LightningDiT-tiny/1", "lightningdit", partial(_lightningdit, "tiny", 1))
register("LightningMAE-tiny/1", "mae", partial(_lightning_mae, "tiny", 1))
