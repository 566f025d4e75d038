"""The latent cache writer: reads the source images (torchvision with per-(seed, image, view) crops, or DALI), and
hands each shard's views to :mod:`usp_scale.data.cache_format`, which encodes them plain and flipped and writes the
shard files; the reader is :mod:`usp_scale.data.cache_reader`.

Rank ``r`` of ``W`` writes the shards with ``s % W == r``. View ``k`` of image ``i`` is the crop seeded by
``(seed, 0, i, k)``, so a rerun writes identical data.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Optional

import torch

from .cache_format import (STORE_DTYPES, LatentCacheError, drop_nonfinite, encode_flips, shard_done,
                           source_fingerprint, write_shard)
from .datasets import CorruptImageError, ImageDataset, TarDataset
from .loaders import CorruptTracker, _BatchTask
from .sampler import ShardSampler
from .transforms import build_transform, describe_augment, sample_seed


def _shard_paths(dataset, s: int, shard_size: int) -> list:
    return [dataset.samples[i].path for i in range(s * shard_size, min((s + 1) * shard_size, len(dataset)))]


def _finish_shard(dataset, out_dir, s, means, logvars, labels, index, bad, settings, tracker, sources=None) -> None:
    """Drop the images with non-finite moments (reported as corrupt), then write shard ``s``."""
    means, logvars, labels, index, dropped = drop_nonfinite(means, logvars, labels, index,
                                                            lambda i: dataset.samples[i].path)
    bad.extend(dropped)
    tracker.add(dropped)
    write_shard(out_dir, s, means, logvars, labels, index, bad, settings, sources)


def write_cache(dataset: ImageDataset, vae, out_dir: str, *, image_size: int = 224, augment: str = "pretrain",
                crop_scale_min: float = 0.2, views: int = 1, seed: int = 0, dtype: str = "fp16",
                shard_size: int = 1000, batch_size: int = 64, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, strict: bool = False, progress: bool = True, loader: str = "torchvision",
                stop_after_shards: Optional[int] = None) -> dict:
    """Encode ``dataset`` into ``out_dir``; returns a summary {"written", "skipped", "corrupt"} for this rank.

    ``augment`` is the crop of each view ("pretrain" = RandomResizedCrop, "adm", "eval", "none"); the flip
    is never random here: every view is stored plain and flipped. ``loader`` "torchvision" (PIL, crops
    seeded per (seed, image, view)) or "dali" (ImageFolder only; decodes on the VAE's GPU when it has one,
    crops seeded per (seed, shard, view)); both rerun a shard identically. ``stop_after_shards`` (tests)
    stops this rank after writing that many shards, as a crash would.
    """
    if loader not in ("torchvision", "dali"):
        raise LatentCacheError(f"cache loader {loader!r} is unknown; use torchvision or dali")
    if dtype not in STORE_DTYPES:
        raise LatentCacheError(f"cache dtype {dtype!r} is unknown; use fp16 or bf16")
    if views < 1:
        raise LatentCacheError(f"--views must be >= 1, got {views}")
    os.makedirs(out_dir, exist_ok=True)
    if strict:  # a corrupt image names this writer's switch, not the training key data.strict
        dataset = copy.copy(dataset)
        dataset.strict_hint = "cache_latents.py --strict makes this an error; run without --strict to skip and report"
    n = len(dataset)
    num_shards = -(-n // shard_size)
    transform = build_transform(augment, image_size, crop_scale_min, flip=False)
    settings = {"num_source_images": n, "shard_size": shard_size, "views": views, "seed": seed, "dtype": dtype,
                "resolution": image_size, "augment": describe_augment(augment, image_size, crop_scale_min),
                "vae": vae.identity(), "latent_shape": list(vae.latent_shape(image_size)),
                "dataset": {"root": dataset.root, "num_classes": len(dataset.classes)}, "loader": loader}
    mine = [s for s in range(num_shards) if s % world_size == rank]
    todo, skipped = [], []
    for s in mine:
        (skipped if shard_done(out_dir, s, settings, _shard_paths(dataset, s, shard_size)) else todo).append(s)
    total_imgs = sum(min(shard_size, n - s * shard_size) for s in todo)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total_imgs, unit="img", desc=f"cache rank {rank}", dynamic_ncols=True, mininterval=1.0)
    tracker = CorruptTracker()
    written = []
    t0 = time.time()
    for s in todo:
        if stop_after_shards is not None and len(written) >= stop_after_shards:
            break
        idx = list(range(s * shard_size, min((s + 1) * shard_size, n)))
        sources = source_fingerprint(_shard_paths(dataset, s, shard_size))  # before reading: a change later shows
        if loader == "dali":
            shard = _encode_shard_dali(dataset, vae, s, idx, image_size=image_size, augment=augment,
                                       crop_scale_min=crop_scale_min, views=views, seed=seed, dtype=dtype,
                                       batch_size=batch_size, num_threads=max(1, num_workers), strict=strict)
            tracker.add(shard[4])
            if bar is not None:
                bar.update(len(idx))
                bar.set_postfix(img_per_s=f"{bar.n / max(time.time() - t0, 1e-9):.1f}", refresh=False)
            _finish_shard(dataset, out_dir, s, *shard, settings, tracker, sources)
            written.append(s)
            continue
        batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
        task = _BatchTask(dataset, transform, batches, seed, 0, strict, views=views)
        dl = torch.utils.data.DataLoader(task, batch_size=None, num_workers=num_workers,
                                         pin_memory=vae.device.type == "cuda")
        means, logvars, labels, index, bad = [], [], [], [], []
        for item in dl:
            bad.extend(item["corrupt"])
            tracker.add(item["corrupt"])
            m = len(item["labels"])
            if m:
                x = item["images"].reshape(m * views, 3, image_size, image_size)       # (m*K,3,H,W)
                mu, lv = encode_flips(vae, x, batch_size, dtype)                       # (m*K,2,C,h,w)
                means.append(mu.reshape((m, views) + mu.shape[1:]))                     # (m,K,2,C,h,w)
                logvars.append(lv.reshape((m, views) + lv.shape[1:]))
                labels.append(item["labels"])
                index.append(item["index"])
            if bar is not None:
                bar.update(m + len(item["corrupt"]))
                bar.set_postfix(img_per_s=f"{bar.n / max(time.time() - t0, 1e-9):.1f}", refresh=False)
        _finish_shard(dataset, out_dir, s, means, logvars, labels, index, bad, settings, tracker, sources)
        written.append(s)
    if bar is not None:
        bar.close()
    return {"written": written, "skipped": skipped, "corrupt": dict(tracker.corrupt), "num_shards": num_shards}

def _encode_shard_dali(dataset, vae, s, idx, *, image_size, augment, crop_scale_min, views, seed, dtype,
                       batch_size, num_threads, strict):
    """One shard through DALI: view k of the shard is one pass seeded by (seed, shard, k)."""
    from .dali import DALIImageLoader, looks_complete
    if isinstance(dataset, TarDataset):
        raise LatentCacheError("--loader dali reads ImageFolder data; use --loader torchvision for tar shards")
    bad, valid = [], []
    for i in idx:
        if looks_complete(dataset.samples[i].path):
            valid.append(i)
        elif strict:
            raise CorruptImageError(f"corrupt (truncated) image {dataset.samples[i].path} (--strict)")
        else:
            bad.append((dataset.samples[i].path, "truncated file (no end-of-image marker)"))
    if not valid:
        return [[], [], [], [], bad]
    sampler = ShardSampler(len(dataset), batch_size=batch_size, shuffle=False, even=False, drop_last=False)
    per_view_mu, per_view_lv, index = [], [], None
    for k in range(views):
        dl = DALIImageLoader(dataset, sampler, augment=augment + "_noflip", size=image_size,
                             crop_scale_min=crop_scale_min, device=vae.device, num_threads=num_threads,
                             strict=strict, precheck=False, indices=valid,
                             pipeline_seed=sample_seed(seed, s, k) % (1 << 31))
        mu, lv, ix = [], [], []
        for b in dl:
            x = b["images"]                                                   # (b,3,H,W) on the VAE device
            a, c = encode_flips(vae, x, len(x), dtype)                        # (b,2,C,h,w) each
            mu.append(a)
            lv.append(c)
            ix.append(b["index"].cpu())
        per_view_mu.append(torch.cat(mu))
        per_view_lv.append(torch.cat(lv))
        index = torch.cat(ix)
    labels = torch.tensor([dataset.samples[i].label for i in index.tolist()], dtype=torch.long)
    return [[torch.stack(per_view_mu, 1)], [torch.stack(per_view_lv, 1)],       # (m,K,2,C,h,w)
            [labels], [index], bad]
