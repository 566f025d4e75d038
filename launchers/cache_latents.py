#!/usr/bin/env python3
"""Encode an image dataset into a sharded, multi-view latent cache (posterior mean + logvar, plain + flipped), and
its channel statistics (latent_stats.json: cache.stats_samples random latents, fp64; what vae.latent_stats reads for
VA-VAE's per-channel normalisation).

The config is the trainer's (docs/architecture.md, "Configuration"): --config RECIPE and key=value overrides of the
sections data (what is encoded and how it is cropped), vae (which VAE: no default), seed and cache (this tool's own:
the output folder, views, storage dtype, shards). The flags below are aliases of those keys.

One process:  python launchers/cache_latents.py --data-root data/synthetic --out cache/syn --views 4 \\
                  --vae-path synthetic-f8
From a recipe: python launchers/cache_latents.py --config configs/pretrain/usp_xlarge_224.yaml \\
                  data.root=/data/imagenet vae.path=weights/sd-vae-ft-ema cache.out=/data/in1k_latents cache.views=8
Many:         torchrun --nproc_per_node 8 launchers/cache_latents.py ... (each rank writes its own shards)
A restarted job skips finished shards (checked by sha256) and writes the missing ones; rank 0 writes
manifest.json once all shards exist.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

from usp_scale.checkpoint.safe_load import CheckpointFileError  # noqa: E402
from usp_scale.config import ConfigError, JobConfig  # noqa: E402
from usp_scale.config.cli import Alias, help_config, parse_tool_args, tool_config, tool_parser  # noqa: E402
from usp_scale.config.schema import CacheJob  # noqa: E402
from usp_scale.data import build_dataset, write_cache, write_manifest  # noqa: E402
from usp_scale.data.cache_reader import LatentCacheError  # noqa: E402
from usp_scale.data.latent_stats import write_latent_stats  # noqa: E402
from usp_scale.data.datasets import CorruptImageError, DatasetError  # noqa: E402
from usp_scale.fileio import DiskFullError  # noqa: E402
from usp_scale.runtime import (StartupError, barrier, cleanup, detect, init_runtime,  # noqa: E402
                               report_startup_failure)
from usp_scale.vae import FrozenVAE, VAELoadError  # noqa: E402
from usp_scale.vae.latent_norm import LatentStatsError  # noqa: E402

SECTIONS = ("data", "vae", "seed", "progress", "cache")
ALIASES = (
    Alias(("--data-root",), "data.root", "DIR"),
    Alias(("--split",), "data.split", "SPLIT"),
    Alias(("--format",), "data.format", "FORMAT"),
    Alias(("--out",), "cache.out", "DIR"),
    Alias(("--views",), "cache.views", "N"),
    Alias(("--image-size",), "data.image_size", "PX"),
    Alias(("--augment",), "data.augment", "AUGMENT"),
    Alias(("--crop-scale-min",), "data.crop_scale_min", "S"),
    Alias(("--vae-path",), "vae.path", "PATH"),
    Alias(("--vae-version",), "vae.version", "VERSION"),
    Alias(("--vae-dtype",), "vae.dtype", "DTYPE"),
    Alias(("--vae-compile",), "vae.compile", const=True),
    Alias(("--dtype",), "cache.dtype", "DTYPE"),
    Alias(("--shard-size",), "cache.shard_size", "N"),
    Alias(("--batch-size",), "cache.batch_size", "N"),
    Alias(("--num-workers",), "data.num_workers", "N"),
    Alias(("--loader",), "cache.loader", "LOADER"),
    Alias(("--seed",), "seed", "SEED"),
    Alias(("--strict",), "data.strict", const=True),
    Alias(("--device",), "cache.device", "DEVICE"),
    Alias(("--no-progress",), "progress", const=False),
    Alias(("--stop-after-shards",), "cache.stop_after_shards", "N"),
    Alias(("--stats-samples",), "cache.stats_samples", "N"),
)


def load_cache_config(argv=None):
    args = parse_tool_args(tool_parser(__doc__, ALIASES, SECTIONS, schema=CacheJob), argv)
    if args.help_config:
        print(help_config(CacheJob, SECTIONS))
        raise SystemExit(0)
    return tool_config(args, ALIASES, SECTIONS, schema=CacheJob)


def main(argv=None):
    cfg = load_cache_config(argv)
    d, v, c = cfg.data, cfg.vae, cfg.cache
    # torchrun, SLURM (srun) or one process: process group, device
    rt = init_runtime(cfg, device=c.device)
    rank, world, device = rt.rank, rt.world_size, rt.device
    dataset = build_dataset(d.root, d.split, d.format)
    vae = FrozenVAE(path=v.path, version=v.version, dtype=v.dtype, device=device, compile=v.compile)
    stop_after = c.stop_after_shards or None
    res = write_cache(dataset, vae, c.out, image_size=d.image_size, augment=d.augment,
                      crop_scale_min=d.crop_scale_min, views=c.views, seed=cfg.seed, dtype=c.dtype,
                      shard_size=c.shard_size, batch_size=c.batch_size, rank=rank, world_size=world,
                      num_workers=d.num_workers, strict=d.strict, progress=cfg.progress, loader=c.loader,
                      stop_after_shards=stop_after)
    for path, msg in res["corrupt"].items():
        print(f"rank {rank}: skipped corrupt image {path}: {msg}", file=sys.stderr)
    print(f"rank {rank}: wrote shards {res['written']}, skipped finished shards {res['skipped']}", flush=True)
    barrier()
    if stop_after is not None:
        print(f"CACHE_STOPPED rank={rank}", flush=True)
        return
    if rank == 0:
        m = write_manifest(c.out)
        print(json.dumps({k: m[k] for k in ("num_images", "num_corrupt", "views", "dtype", "resolution",
                                            "latent_shape")}), flush=True)
        st = write_latent_stats(c.out, c.stats_samples, cfg.seed, verify=d.latent_verify, progress=cfg.progress)
        print(f"latent statistics: {st['samples']} of {st['records_total']} latents (seed {st['seed']}) -> "
              f"{os.path.join(c.out, 'latent_stats.json')}", flush=True)
    if world > 1:
        barrier()
        cleanup()
    print(f"CACHE_DONE rank={rank}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a bad input file, argument or config value: its message (naming it), not a traceback
        errors = (ConfigError, CheckpointFileError, DiskFullError, FileNotFoundError, CorruptImageError, DatasetError,
                  LatentCacheError, VAELoadError, LatentStatsError, StartupError)
        if not isinstance(e, errors):
            raise
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, ConfigError):  # before start-up: the other ranks name this one instead of waiting
            report_startup_failure(detect(), JobConfig().engine.startup_timeout_s, f"config error: {e}")
        sys.exit(2)
