#!/usr/bin/env python
"""Sample a DiT/SiT checkpoint into PNGs + one ADM .npz + a grid (python or torchrun).

The config is the trainer's (docs/architecture.md, "Configuration"): --config RECIPE (e.g. the finetuning recipe of
the model) and key=value overrides of the sections model, vae, data.image_size, eval (sampler, steps, guidance,
batch size, precision, seed: the in-training FID's settings), engine (tf32, compile) and sample (this tool's own:
ckpt, out_dir, num_samples, ...). The flags below are aliases of those keys. model.img_size (the latent side) follows
data.image_size and the VAE unless it is set.

Examples
  python launchers/sample.py --config configs/finetune/dit_xl_256.yaml sample.ckpt=0400000.pt \\
      vae.path=/weights/sd-vae-ft-ema sample.num_samples=50000 sample.out_dir=samples/dit-xl engine.tf32=true
  python launchers/sample.py --model DiT-XL/2 --ckpt 0400000.pt --vae /weights/sd-vae-ft-ema --image-size 256 \\
      --num-samples 50000 --out-dir samples/dit-xl --tf32 --compile          # the same with flags
  torchrun --nproc_per_node 8 launchers/sample.py --model SiT-XL/2 --ckpt sit.safetensors --sampler sde ...

Images depend only on (eval.seed, sample index): any number of processes gives the same files, and a
restarted job skips indices whose PNG exists.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

import torch  # noqa: E402

from usp_scale.checkpoint.safe_load import CheckpointFileError, weights_content_id  # noqa: E402
from usp_scale.config import ConfigError, JobConfig  # noqa: E402
from usp_scale.config.cli import Alias, help_config, parse_tool_args, tool_config, tool_parser  # noqa: E402
from usp_scale.config.schema import SampleJob  # noqa: E402
from usp_scale.config.validate import VAE_GEOMETRY  # noqa: E402
from usp_scale.diffusion import create_diffusion  # noqa: E402
from usp_scale.fileio import DiskFullError, remove_stale_temps  # noqa: E402
from usp_scale.models import create_model, model_family  # noqa: E402
from usp_scale.runtime import (StartupError, barrier, cleanup, detect, init_runtime,  # noqa: E402
                               report_startup_failure)
from usp_scale.sample import build_sampler, infer_num_classes, make_decoder, make_model_fn, run_sampling  # noqa: E402
from usp_scale.transfer.formats import load_weights  # noqa: E402
from usp_scale.transport import create_transport  # noqa: E402
from usp_scale.vae import FrozenVAE, VAELoadError  # noqa: E402

SECTIONS = ("model", "vae", "data.image_size", "eval", "engine", "sample", "progress")
ALIASES = (
    Alias(("--model",), "model.name", "NAME"),
    Alias(("--ckpt",), "sample.ckpt", "FILE"),
    Alias(("--weights",), "sample.weights", "WHICH"),
    Alias(("--image-size",), "data.image_size", "PX"),
    Alias(("--num-classes",), "model.num_classes", "N"),
    Alias(("--model-kwargs",), "sample.model_kwargs", "JSON"),
    Alias(("--vae",), "vae.path", "PATH"),
    Alias(("--vae-version",), "vae.version", "VERSION"),
    Alias(("--vae-scale",), "vae.scale", "SCALE"),
    Alias(("--latent-stats",), "vae.latent_stats", "PATH"),
    Alias(("--timestep-shift",), "eval.timestep_shift", "S"),
    Alias(("--vae-dtype",), "vae.dtype", "DTYPE"),
    Alias(("--sampler",), "eval.sampler", "KIND"),
    Alias(("--steps",), "eval.steps", "N"),
    Alias(("--ddim-eta",), "eval.ddim_eta", "ETA"),
    Alias(("--atol",), "sample.atol", "TOL"),
    Alias(("--rtol",), "sample.rtol", "TOL"),
    Alias(("--sde-last-step",), "sample.sde_last_step", "DT"),
    Alias(("--cfg-scale",), "eval.cfg_scale", "SCALE"),
    Alias(("--cfg-interval",), keys=("eval.cfg_interval_low", "eval.cfg_interval_high"), metavar="T"),
    Alias(("--cfg-channels",), "eval.cfg_channels", "N"),
    Alias(("--num-samples",), "sample.num_samples", "N"),
    Alias(("--batch-size",), "eval.batch_size", "N"),
    Alias(("--seed",), "eval.seed", "SEED"),
    Alias(("--labels",), "sample.labels", "HOW"),
    Alias(("--out-dir",), "sample.out_dir", "DIR"),
    Alias(("--no-npz",), "sample.npz", const=False),
    Alias(("--grid",), "sample.grid", "N"),
    Alias(("--max-batches",), "sample.max_batches", "N"),
    Alias(("--precision",), "eval.precision", "PRECISION"),
    Alias(("--compile",), "engine.compile", const=True),
    Alias(("--attn-backend",), "model.attn_backend", "BACKEND"),
    Alias(("--tf32",), "engine.tf32", const=True),
    Alias(("--device",), "sample.device", "DEVICE"),
    Alias(("--no-progress",), "progress", const=False),
)


def build_parser():
    return tool_parser(__doc__, ALIASES, SECTIONS, schema=SampleJob)


def resolve_latent_side(cfg) -> None:
    """model.img_size (the latent side) follows data.image_size and the VAE's downsampling unless it was set; a
    model in pixel space (vae.path=none) samples at data.image_size."""
    if "model.img_size" in cfg._origins:
        return
    ds = 1 if cfg.vae.path.lower() == "none" else VAE_GEOMETRY[cfg.vae.version][1]
    if cfg.data.image_size % ds:
        raise ConfigError(f"data.image_size={cfg.data.image_size} is not a multiple of the {cfg.vae.version} VAE's "
                          f"downsampling {ds}")
    cfg.model.img_size = cfg.data.image_size // ds


def load_sample_config(argv: Optional[list] = None):
    args = parse_tool_args(build_parser(), argv)
    if args.help_config:
        print(help_config(SampleJob, SECTIONS))
        raise SystemExit(0)
    cfg = tool_config(args, ALIASES, SECTIONS, schema=SampleJob)
    resolve_latent_side(cfg)
    return cfg


def build_model(cfg, device: torch.device, attn_backend: str):
    """The registry model with the checkpoint's weights (strict: every key must match)."""
    m = cfg.model
    kwargs = dict(input_size=m.img_size, in_channels=m.in_chans, num_classes=m.num_classes, learn_sigma=m.learn_sigma)
    kwargs.update(json.loads(cfg.sample.model_kwargs))
    model = create_model(m.name, attn_backend=attn_backend, kernels=m.kernels, **kwargs)
    load_weights(model, cfg.sample.ckpt, which=cfg.sample.weights)
    return model.to(device).eval().requires_grad_(False)


def build_vae(cfg, device: torch.device):
    """The frozen VAE (decode: model-space latents -> [-1, 1] images), or None for a model in pixel space."""
    v = cfg.vae
    if v.path.lower() == "none":
        return None
    vae = FrozenVAE(path=v.path, version=v.version, scale=v.scale, dtype=v.dtype, device=device,
                    latent_stats=v.latent_stats, latent_multiplier=v.latent_multiplier)
    ds = VAE_GEOMETRY[v.version][1]
    if vae.downsample != ds:
        raise ConfigError(f"vae.path={v.path}: the VAE downsamples by {vae.downsample}, vae.version={v.version} by "
                          f"{ds}: set vae.version to the VAE's")
    return vae


def main(argv: Optional[list] = None) -> dict:
    cfg = load_sample_config(argv)
    s, e = cfg.sample, cfg.eval
    # torchrun, SLURM (srun) or one process: process group, device, TF32, the attention kernel (agreed over ranks)
    rt = init_runtime(cfg, device=s.device)
    rank, world, device = rt.rank, rt.world_size, rt.device
    family = model_family(cfg.model.name)
    vae = build_vae(cfg, device)
    model = build_model(cfg, device, rt.attn_backend)
    num_classes = infer_num_classes(model)
    process = create_transport() if family in ("sit", "lightningdit") else \
        create_diffusion("", learn_sigma=model.learn_sigma)
    net = torch.compile(model) if cfg.engine.compile else model
    interval = (e.cfg_interval_low, e.cfg_interval_high) if e.cfg_interval_low <= e.cfg_interval_high else None
    model_fn = make_model_fn(net, num_classes=num_classes, cfg_scale=e.cfg_scale, cfg_channels=e.cfg_channels,
                             interval=interval, precision=e.precision)
    sampler = build_sampler(e.sampler, process, e.steps, eta=e.ddim_eta, atol=s.atol, rtol=s.rtol,
                            last_step=s.sde_last_step, timestep_shift=e.timestep_shift)
    decode = make_decoder(vae)
    meta = {"model": cfg.model.name, "ckpt": os.path.abspath(s.ckpt), "weights": s.weights,
            "ckpt_content": weights_content_id(s.ckpt),  # a resume into this folder needs the same weights
            "vae_content": getattr(vae, "content_fingerprint", None),
            "sampling_precision": e.precision, "cfg_scale": e.cfg_scale,
            "cfg_interval": list(interval) if interval else None, "cfg_channels": e.cfg_channels,
            "vae": cfg.vae.path, "vae_scale": getattr(vae, "scale", None),
            "latent_norm": vae.norm.describe() if vae is not None else None}
    meta.update(sampler.describe())
    side = cfg.model.img_size
    if rank == 0 and os.path.isdir(s.out_dir):  # before any rank writes: the temp files of a killed sampling job
        for p in remove_stale_temps(s.out_dir):
            print(f"[usp_scale] removed {p} (left by a sampling job killed mid-write)", flush=True)
    barrier()
    res = run_sampling(model_fn, sampler, decode, num_samples=s.num_samples, out_dir=s.out_dir,
                       latent_shape=(model.in_channels, side, side), num_classes=num_classes,
                       seed=e.seed, batch_size=e.batch_size, device=device, labels=s.labels,
                       rank=rank, world_size=world, meta=meta, npz=s.npz, grid=s.grid,
                       progress=cfg.progress, max_batches=s.max_batches or None)
    print(f"[rank {rank}] wrote {res['written']} images, skipped {res['skipped']} existing, "
          f"{res['images_per_s']:.2f} img/s; missing overall: {res['missing']}"
          + (f"; npz: {res['npz']}" if res["npz"] else "") + (f"; grid: {res['grid']}" if res["grid"] else ""),
          flush=True)
    if world > 1:
        barrier()
        cleanup()
    return res


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Exception as e:  # a bad input file, argument or config value: its message (naming it), not a traceback
        errors = (ConfigError, CheckpointFileError, DiskFullError, FileNotFoundError, VAELoadError, KeyError,
                  ValueError, StartupError)
        if not isinstance(e, errors):
            raise
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, ConfigError):  # before start-up: the other ranks name this one instead of waiting
            report_startup_failure(detect(), JobConfig().engine.startup_timeout_s, f"config error: {e}")
        sys.exit(2)
