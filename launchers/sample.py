#!/usr/bin/env python
"""Sample a DiT/SiT checkpoint into PNGs + one ADM .npz + a grid (python or torchrun).

Examples
  python launchers/sample.py --model DiT-XL/2 --ckpt 0400000.pt --vae /weights/sd-vae-ft-ema \
      --num-samples 50000 --out-dir samples/dit-xl --tf32 --compile
  torchrun --nproc_per_node 8 launchers/sample.py --model SiT-XL/2 --ckpt sit.safetensors --sampler sde ...

Images depend only on (--seed, sample index): any number of processes gives the same files, and a
restarted job skips indices whose PNG exists.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="registry name for usp_scale.models.create_model, e.g. DiT-XL/2, "
                   "SiT-B/2, DiT-B/2-VAE-simple")
    g.add_argument("--ckpt", required=True, help="model-only .safetensors, or a .pt/.pth holding a state dict or "
                   "the official {'model', 'ema', ...} dict")
    g.add_argument("--weights", default="auto", choices=["auto", "ema", "model"],
                   help="weights of an official {'model','ema'} checkpoint: auto = ema when present (default)")
    g.add_argument("--image-size", type=int, default=256, help="image side in pixels (latent side = this / 8)")
    g.add_argument("--num-classes", type=int, default=1000, help="number of classes of the model")
    g.add_argument("--model-kwargs", default="{}", help="extra JSON keyword arguments for create_model")
    g = p.add_argument_group("VAE")
    g.add_argument("--vae", default="", help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema), a single "
                   "weights file, 'tiny-random' (demo) or 'none' (the model works in pixel space)")
    g.add_argument("--vae-version", default="d8", choices=["d8", "d16"], help="VAE layout: d8 (SD-VAE) or d16 (KL-16)")
    g.add_argument("--vae-scale", type=float, default=0.0,
                   help="latent scale factor (the VAE decodes model output / scale); 0 = the version's default "
                   "(0.18215 for d8, 0.2325 for d16)")
    g.add_argument("--vae-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="VAE decoding precision")
    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", default=None, choices=["ddpm", "ddim", "sde", "ode", "heun", "euler"],
                   help="default: ddpm for DiT, sde for SiT")
    g.add_argument("--steps", type=int, default=250, help="sampling steps (respaced DDPM/DDIM steps, SDE grid "
                   "points, Heun/Euler steps; unused by the adaptive ODE)")
    g.add_argument("--ddim-eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    g.add_argument("--atol", type=float, default=1e-6, help="dopri5 absolute tolerance (sampler ode)")
    g.add_argument("--rtol", type=float, default=1e-3, help="dopri5 relative tolerance (sampler ode)")
    g.add_argument("--sde-last-step", type=float, default=0.04, help="size of the final deterministic SDE step")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1.0 = off)")
    g.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="guide only for model times in [LOW, HIGH] (DiT step index, SiT t in [0, 1])")
    g.add_argument("--cfg-channels", type=int, default=0,
                   help="output channels guided: 0 = all latent channels, 3 = the official DiT/SiT behaviour")
    g = p.add_argument_group("job")
    g.add_argument("--num-samples", type=int, default=50000, help="number of images (indices 0..N-1)")
    g.add_argument("--batch-size", type=int, default=128, help="images per process per batch")
    g.add_argument("--seed", type=int, default=0, help="global seed; labels and noise depend on (seed, index)")
    g.add_argument("--labels", default="random", choices=["random", "balanced"],
                   help="class labels: uniform random per index (official) or index %% num_classes")
    g.add_argument("--out-dir", required=True, help="output folder for {index:06d}.png, the .npz and grid.png")
    g.add_argument("--no-npz", action="store_true", help="do not assemble the ADM .npz at the end")
    g.add_argument("--grid", type=int, default=64, help="images in grid.png (0 = no grid)")
    g.add_argument("--max-batches", type=int, default=None,
                   help="stop each process after this many batches (time-limited jobs; rerun to continue)")
    g = p.add_argument_group("performance")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="model precision (bf16 = autocast)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--attn-backend", default="auto",
                   choices=["auto", "sdpa", "flash3", "flash2", "cudnn", "efficient", "math", "reference"],
                   help="attention backend, chosen once at start-up (auto: FlashAttention-3/2 when installed, "
                        "else SDPA with cuDNN first; math on a CPU); a forced unavailable backend is an error")
    g.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions (the official evaluation did)")
    g.add_argument("--device", default=None, help="device (default: cuda:LOCAL_RANK if available, else cpu)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def build_model(args, device: torch.device, latent_size: int, attn_backend: str):
    """The registry model with the checkpoint's weights (strict: every key must match)."""
    from usp_scale.models import create_model
    from usp_scale.transfer.formats import load_weights
    kwargs = json.loads(args.model_kwargs)
    kwargs.setdefault("input_size", latent_size)
    kwargs.setdefault("num_classes", args.num_classes)
    model = create_model(args.model, attn_backend=attn_backend, **kwargs)
    load_weights(model, args.ckpt, which=args.weights)
    return model.to(device).eval().requires_grad_(False)


def build_vae(args, device: torch.device):
    """The frozen VAE (decode: model-space latents -> [-1, 1] images), or None for pixel-space models.

    Uses usp_scale.vae.FrozenVAE (diffusers folder, single weights file or 'tiny-random'); where that
    module is absent, a local diffusers AutoencoderKL folder is loaded directly (same decoder)."""
    if args.vae.lower() == "none":
        return None
    if not args.vae:
        raise SystemExit("--vae is required: a local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema), a single "
                         "weights file, 'tiny-random' (demo), or 'none' for a pixel-space model")
    try:
        from usp_scale.vae import FrozenVAE
    except ImportError:
        FrozenVAE = None
    if FrozenVAE is not None:
        return FrozenVAE(path=args.vae, version=args.vae_version, scale=args.vae_scale, dtype=args.vae_dtype,
                         device=device)
    from diffusers import AutoencoderKL
    if not os.path.isdir(args.vae):
        raise SystemExit(f"--vae {args.vae}: not a folder (expected a diffusers AutoencoderKL with config.json)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.vae_dtype]
    vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True).to(device, dtype).eval().requires_grad_(False)
    vae.scale = args.vae_scale or {"d8": 0.18215, "d16": 0.2325}[args.vae_version]
    return vae


def vae_downsample(vae) -> int:
    if hasattr(vae, "downsample"):
        return int(vae.downsample)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def main(argv: Optional[list] = None) -> dict:
    args = build_parser().parse_args(argv)
    from usp_scale.diffusion import create_diffusion
    from usp_scale.sample import build_sampler, infer_num_classes, make_decoder, make_model_fn, run_sampling
    from usp_scale.transport import create_transport

    from usp_scale.config import JobConfig
    from usp_scale.runtime import init_runtime
    cfg = JobConfig()
    cfg.engine.tf32, cfg.model.attn_backend, cfg.seed = args.tf32, args.attn_backend, args.seed
    # torchrun, SLURM (srun) or one process: process group, device, TF32, the attention kernel (agreed over ranks)
    rt = init_runtime(cfg, device=args.device)
    rank, world, device = rt.rank, rt.world_size, rt.device

    from usp_scale.models.registry import model_family
    family = model_family(args.model)
    if family not in ("dit", "sit"):
        raise SystemExit(f"--model {args.model} is a {family} model; sampling needs a DiT or SiT")
    vae = build_vae(args, device)
    if vae is None:
        latent = args.image_size
    else:
        ds = vae_downsample(vae)
        if args.image_size % ds:
            raise SystemExit(f"--image-size {args.image_size} is not a multiple of the VAE downsampling {ds}")
        latent = args.image_size // ds
    model = build_model(args, device, latent, rt.attn_backend)
    num_classes = infer_num_classes(model)
    is_sit = family == "sit"
    if is_sit:
        process = create_transport()
        kind = args.sampler or "sde"
    else:
        process = create_diffusion("", learn_sigma=getattr(model, "learn_sigma", True))
        kind = args.sampler or "ddpm"
    net = torch.compile(model) if args.compile else model
    interval = tuple(args.cfg_interval) if args.cfg_interval else None
    model_fn = make_model_fn(net, num_classes=num_classes, cfg_scale=args.cfg_scale,
                             cfg_channels=args.cfg_channels, interval=interval, precision=args.precision)
    sampler = build_sampler(kind, process, args.steps, eta=args.ddim_eta, atol=args.atol, rtol=args.rtol,
                            last_step=args.sde_last_step)
    decode = make_decoder(vae)
    meta = {"model": args.model, "ckpt": os.path.abspath(args.ckpt), "weights": args.weights,
            "sampling_precision": args.precision, "cfg_scale": args.cfg_scale,
            "cfg_interval": list(interval) if interval else None, "cfg_channels": args.cfg_channels,
            "vae": args.vae, "vae_scale": getattr(vae, "scale", None)}
    meta.update(sampler.describe())
    res = run_sampling(model_fn, sampler, decode, num_samples=args.num_samples, out_dir=args.out_dir,
                       latent_shape=(model.in_channels, latent, latent), num_classes=num_classes,
                       seed=args.seed, batch_size=args.batch_size, device=device, labels=args.labels,
                       rank=rank, world_size=world, meta=meta, npz=not args.no_npz, grid=args.grid,
                       progress=not args.no_progress, max_batches=args.max_batches)
    print(f"[rank {rank}] wrote {res['written']} images, skipped {res['skipped']} existing, "
          f"{res['images_per_s']:.2f} img/s; missing overall: {res['missing']}"
          + (f"; npz: {res['npz']}" if res["npz"] else "") + (f"; grid: {res['grid']}" if res["grid"] else ""),
          flush=True)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return res


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Exception as e:  # a bad input file or argument: its message (naming the file), not a traceback
        from usp_scale.checkpoint.safe_load import CheckpointFileError
        from usp_scale.fileio import DiskFullError
        from usp_scale.vae import VAELoadError
        errors = (CheckpointFileError, DiskFullError, FileNotFoundError, VAELoadError, KeyError, ValueError)
        if not isinstance(e, errors):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
