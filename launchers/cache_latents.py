#!/usr/bin/env python3
"""Encode an image dataset into a sharded, multi-view latent cache (posterior mean + logvar, plain + flipped).

One process:  python launchers/cache_latents.py --data-root data/synthetic --out cache/syn --views 4
Many:         torchrun --nproc_per_node 8 launchers/cache_latents.py ... (each rank writes its own shards)
A restarted job skips finished shards (checked by sha256) and writes the missing ones; rank 0 writes
manifest.json once all shards exist.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

import torch


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="dataset root (ImageFolder with train/ or a folder of .tar shards)")
    p.add_argument("--split", default="train", help="sub-folder of the root to encode (default train; '' = root)")
    p.add_argument("--format", default="folder", choices=["folder", "wds"], help="dataset layout (default folder)")
    p.add_argument("--out", required=True, help="output cache folder")
    p.add_argument("--views", type=int, default=1, help="augmented views per image, each stored plain and flipped")
    p.add_argument("--image-size", type=int, default=224, help="crop size in pixels (224 -> 28x28 d8 latents)")
    p.add_argument("--augment", default="pretrain", choices=["pretrain", "adm", "eval", "none"],
                   help="crop of each view: pretrain = RandomResizedCrop(scale min..1, bicubic), adm = ADM center "
                        "crop, eval = resize 256 + center crop 224, none = resize")
    p.add_argument("--crop-scale-min", type=float, default=0.2, help="RandomResizedCrop lower scale (default 0.2)")
    p.add_argument("--vae-path", default="tiny-random", help="diffusers folder, .safetensors/.ckpt file, or tiny-random")
    p.add_argument("--vae-version", default="d8", choices=["d8", "d16"], help="VAE family (default d8)")
    p.add_argument("--vae-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="VAE compute precision")
    p.add_argument("--vae-compile", action="store_true", help="torch.compile the VAE encoder")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="storage dtype of the moments")
    p.add_argument("--shard-size", type=int, default=1000, help="source images per shard (default 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE call (default 64)")
    p.add_argument("--num-workers", type=int, default=4, help="decode worker processes (torchvision) or DALI "
                                                               "threads per rank (default 4)")
    p.add_argument("--loader", default="torchvision", choices=["torchvision", "dali"],
                   help="decoder: torchvision (PIL, reproduces the paper's resampling; default) or dali (ImageFolder "
                        "only; decodes on the GPU when the VAE runs on one)")
    p.add_argument("--seed", type=int, default=0, help="augmentation seed (view k of image i uses (seed, i, k))")
    p.add_argument("--strict", action="store_true", help="stop on a corrupt image instead of skipping and reporting it")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    p.add_argument("--stop-after-shards", type=int, default=None,
                   help="testing: stop this rank after writing N shards, as a crash would")
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    from usp_scale.config import JobConfig
    from usp_scale.runtime import init_runtime
    cfg = JobConfig()
    cfg.seed = a.seed
    # torchrun, SLURM (srun) or one process: process group and device
    rt = init_runtime(cfg, device=a.device)
    rank, world, device = rt.rank, rt.world_size, rt.device
    from usp_scale.data import build_dataset, write_cache, write_manifest
    from usp_scale.vae import FrozenVAE
    dataset = build_dataset(a.data_root, a.split, a.format)
    vae = FrozenVAE(path=a.vae_path, version=a.vae_version, dtype=a.vae_dtype, device=device, compile=a.vae_compile)
    res = write_cache(dataset, vae, a.out, image_size=a.image_size, augment=a.augment,
                      crop_scale_min=a.crop_scale_min, views=a.views, seed=a.seed, dtype=a.dtype,
                      shard_size=a.shard_size, batch_size=a.batch_size, rank=rank, world_size=world,
                      num_workers=a.num_workers, strict=a.strict, progress=not a.no_progress, loader=a.loader,
                      stop_after_shards=a.stop_after_shards)
    for path, msg in res["corrupt"].items():
        print(f"rank {rank}: skipped corrupt image {path}: {msg}", file=sys.stderr)
    print(f"rank {rank}: wrote shards {res['written']}, skipped finished shards {res['skipped']}", flush=True)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    if a.stop_after_shards is not None:
        print(f"CACHE_STOPPED rank={rank}", flush=True)
        return
    if rank == 0:
        m = write_manifest(a.out)
        print(json.dumps({k: m[k] for k in ("num_images", "num_corrupt", "views", "dtype", "resolution",
                                            "latent_shape")}), flush=True)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    print(f"CACHE_DONE rank={rank}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a bad input file or argument: its message (naming the file), not a traceback
        from usp_scale.checkpoint.safe_load import CheckpointFileError
        from usp_scale.fileio import DiskFullError
        from usp_scale.data.datasets import CorruptImageError, DatasetError
        from usp_scale.data.latents import LatentCacheError
        from usp_scale.vae import VAELoadError
        errors = (CheckpointFileError, DiskFullError, FileNotFoundError, CorruptImageError, DatasetError,
                  LatentCacheError, VAELoadError)
        if not isinstance(e, errors):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
