"""``build_loader`` / ``build_image_loader``: config sections -> a resumable loader on one rank."""
from __future__ import annotations


import dataclasses

import torch

from ..vae import SCALE, FrozenVAE
from ..vae.frozen import GEOMETRY
from ..vae.latent_norm import build_latent_norm
from ..vae.named import shipped_scale
from .cache_reader import LatentCache, LatentCacheLoader
from .datasets import build_dataset
from .gpu_decode import GPU_AUGMENTS, GPUCropLoader
from .loaders import TorchvisionImageLoader
from .online import OnlineEncodingLoader
from .sampler import ShardSampler
from .synthetic_latents import build_synthetic_loader
from .transforms import build_transform

BACKENDS = ("auto", "dali", "torchvision", "gpu")
# The augmentations for which DALI gives the PIL path's pixels within this tolerance, measured against torchvision
# by tests/test_data_dali.py (mean and max |difference| over the images, in 8-bit grey levels; the residue is JPEG
# decoding and the bicubic filter). Only these may run on DALI under data.loader=auto. Not in it: "pretrain" (the
# same crop distribution but another random stream, so other crops), "adm" (a BOX halving step that DALI only
# approximates, up to 90 grey levels at edges), "finetune"/"linprobe" (no DALI pipeline).
DALI_TOLERANCE = {"eval": {"mean": 0.25, "max": 8.0}}


def resolve_loader_backend(choice: str, augment: str = "pretrain") -> str:
    """"auto" -> "torchvision" (the official PIL pixels), or "dali" for an augmentation in :data:`DALI_TOLERANCE`
    when nvidia.dali imports. "dali" is an opt-in for speed; its inputs differ (docs/data.md).

    A forced choice that cannot run is an error, never a silent switch.
    """
    from .dali import DALI_AUGMENTS, dali_available
    if choice not in BACKENDS:
        raise ValueError(f"data.loader={choice!r} is unknown; use one of {BACKENDS}")
    if choice == "torchvision":
        return choice
    base = augment[: -len("_noflip")] if augment.endswith("_noflip") else augment
    if choice == "gpu":
        if augment not in GPU_AUGMENTS:
            raise ValueError(f"data.loader=gpu implements data.augment {' or '.join(GPU_AUGMENTS)}, not {augment}: "
                             "set data.loader=torchvision (or auto)")
        return choice
    if choice == "dali":
        if not dali_available():
            raise RuntimeError("data.loader=dali but nvidia.dali is not importable: pip install nvidia-dali-cuda130 "
                               "(or nvidia-dali-cuda120), or set data.loader=torchvision")
        if base not in DALI_AUGMENTS:
            raise ValueError(f"data.augment={augment} has no DALI pipeline (it implements {', '.join(DALI_AUGMENTS)}; "
                             "finetune needs RandAugment and RandomErasing, linprobe the one-draw crop): set "
                             "data.loader=torchvision (or auto)")
        return choice
    return "dali" if base in DALI_TOLERANCE and dali_available() else "torchvision"


def build_image_loader(data_cfg, *, rank: int = 0, world_size: int = 1, seed: int = 0, train: bool = True,
                       device="cpu"):
    """Resumable loader yielding ``{"images": (N,3,S,S) in [-1,1], "labels": (N,), "index": (N,)}`` on device.

    train=True: ``data.split`` with ``data.augment``, shuffled per epoch, equal shards per global rank.
    train=False: ``data.val_split`` with the eval crop, in order, each image exactly once over all ranks.
    """
    split = data_cfg.split if train else data_cfg.val_split
    augment = data_cfg.augment if train else "eval"
    dataset = build_dataset(data_cfg.root, split, data_cfg.format)
    sampler = ShardSampler(len(dataset), rank, world_size, seed, shuffle=train, even=train,
                           batch_size=data_cfg.batch_size, drop_last=data_cfg.drop_last if train else False)
    backend = resolve_loader_backend(data_cfg.loader, augment)
    if backend == "gpu":
        return GPUCropLoader(dataset, sampler, augment=augment, size=data_cfg.image_size,
                             crop_scale_min=data_cfg.crop_scale_min, num_workers=data_cfg.num_workers, device=device,
                             strict=data_cfg.strict)
    if backend == "dali":
        from .dali import DALIImageLoader
        return DALIImageLoader(dataset, sampler, augment=augment, size=data_cfg.image_size,
                               crop_scale_min=data_cfg.crop_scale_min, device=device,
                               decode_device=data_cfg.dali_device, num_threads=max(1, data_cfg.num_workers),
                               strict=data_cfg.strict, precheck=data_cfg.dali_precheck)
    transform = build_transform(augment, data_cfg.image_size, data_cfg.crop_scale_min)
    return TorchvisionImageLoader(dataset, transform, sampler, num_workers=data_cfg.num_workers, device=device,
                                  strict=data_cfg.strict)


def _expected_latent_shape(vae_cfg, image_size: int):
    ch, ds = GEOMETRY[vae_cfg.version]
    return (ch, image_size // ds, image_size // ds)


def build_loader(data_cfg, vae_cfg, *, rank: int = 0, world_size: int = 1, seed: int = 0, train: bool = True,
                 device="cpu", latent_shape=None, num_classes=None):
    """Resumable loader yielding ``{"latents": (N,C,h,w) fp32 scaled, "labels": (N,) long, "index"}`` on device.

    ``data.format == "latents"``: reads the cache at ``data.latent_cache`` (``data.latent_cache_val`` for
    train=False; without it evaluation encodes ``data.val_split`` online). Otherwise images are decoded
    (DALI or torchvision, ``data.loader``) and encoded by the frozen VAE on the fly.
    ``data.format == "synthetic"``: ``data.synthetic_samples`` random latents of ``latent_shape`` (the model's
    (C,h,w); default: the VAE's latent shape at ``data.image_size``) with labels below ``num_classes``
    (default ``data.num_classes``), no files and no VAE.
    """
    if data_cfg.format == "synthetic":
        shape = latent_shape or _expected_latent_shape(vae_cfg, data_cfg.image_size)
        return build_synthetic_loader(data_cfg, shape, num_classes or data_cfg.num_classes, rank=rank,
                                      world_size=world_size, seed=seed, train=train, device=device)
    cache_path = data_cfg.latent_cache if train else data_cfg.latent_cache_val
    if data_cfg.format == "latents" and cache_path:
        cache = LatentCache(cache_path, verify=data_cfg.latent_verify)
        # The VAE is compared by its content fingerprint (vae.path is loaded once for it), never by name.
        cache.check(image_size=data_cfg.image_size, vae_version=vae_cfg.version, vae_path=vae_cfg.path,
                    latent_shape=_expected_latent_shape(vae_cfg, data_cfg.image_size), num_classes=num_classes,
                    augment=data_cfg.augment if train else None, crop_scale_min=data_cfg.crop_scale_min)
        sampler = ShardSampler(len(cache), rank, world_size, seed, shuffle=train, even=train,
                               batch_size=data_cfg.batch_size, drop_last=data_cfg.drop_last if train else False)
        scale = vae_cfg.scale or shipped_scale(vae_cfg.path) or SCALE[vae_cfg.version]
        # the scale factor, or the channel statistics (checked against the cache's channels and VAE content)
        norm = build_latent_norm(scale, vae_cfg.latent_stats, vae_cfg.latent_multiplier,
                                 channels=cache.latent_shape[0], vae_content=cache.manifest["vae"].get("content"))
        return LatentCacheLoader(cache, sampler, scale=norm, sample=data_cfg.latent_sample, device=device)
    if data_cfg.format == "latents" and train:
        raise ValueError("data.format=latents needs data.latent_cache (a folder written by launchers/cache_latents.py)")
    if data_cfg.format == "latents":
        data_cfg = dataclasses.replace(data_cfg, format="folder")
    images = build_image_loader(data_cfg, rank=rank, world_size=world_size, seed=seed, train=train, device=device)
    vae = FrozenVAE.from_config(vae_cfg, device=device)
    overlap = data_cfg.online_overlap and torch.device(device).type == "cuda"
    return OnlineEncodingLoader(images, vae, posterior=vae_cfg.posterior, overlap=overlap)
