"""Data path: image datasets -> (DALI | torchvision) augmentation -> frozen VAE -> latent batches.

Entry points used by training: :func:`build_loader` (latent batches, from a cache or online) and
:func:`build_image_loader` (image batches in [-1, 1]). Both return resumable loaders (see
:mod:`usp_scale.data.loaders` for the contract).
"""
from .build import build_image_loader, build_loader, resolve_loader_backend
from .datasets import (CorruptImageError, DatasetError, ImageFolderDataset, TarDataset, build_dataset)
from .cache_format import write_manifest
from .cache_writer import write_cache
from .cache_reader import LatentCache, LatentCacheError, LatentCacheLoader
from .loaders import OnlineLatentLoader, ResumableLoader, TorchvisionImageLoader
from .sampler import ShardSampler
from .transforms import adm_center_crop, build_transform

__all__ = ["build_image_loader", "build_loader", "resolve_loader_backend", "CorruptImageError", "DatasetError",
           "ImageFolderDataset", "TarDataset", "build_dataset", "LatentCache", "LatentCacheError",
           "LatentCacheLoader", "write_cache", "write_manifest", "OnlineLatentLoader", "ResumableLoader",
           "TorchvisionImageLoader", "ShardSampler", "adm_center_crop", "build_transform"]
