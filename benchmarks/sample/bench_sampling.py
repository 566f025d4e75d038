#!/usr/bin/env python
"""DiT sampling throughput on one GPU and the projected cost of FID-50K.

Measures, for each mode (eager, torch.compile, torch.compile with CUDA graphs):
  * forward img/s: one model call on a batch (CUDA events, median over --iters after --warmup);
  * sampler img-step/s: the real DDPM loop (per-index noise streams, learned variance, CFG off)
    over --loop-steps steps, i.e. forward + sampler arithmetic + per-sample CPU noise;
  * projected FID-50K GPU-hours = 50,000 x steps / (img-step/s) / 3600 (x2 model work with CFG),
    plus the measured VAE decode when --vae is given.
Baseline (issue #6): the official model, compiled, runs the forward at 2,033 img/s on an H200,
i.e. 1.7 GPU-hours for FID-50K at 250 steps without guidance; goal <= 1.3 on the same card.

GPU only: on a machine without CUDA it says so and exits with status 2. Random weights (throughput
does not depend on them). Record the card printed in the output with every number.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from usp_scale.config import JobConfig  # noqa: E402
from usp_scale.diffusion import create_diffusion  # noqa: E402
from usp_scale.models import create_model  # noqa: E402
from usp_scale.runtime import init_runtime  # noqa: E402
from usp_scale.sample import IndexedNoise, build_sampler, make_decoder, make_model_fn  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2", help="registry name for usp_scale.models.create_model")
    p.add_argument("--batch", type=int, default=256, help="images per forward")
    p.add_argument("--image-size", type=int, default=256, help="image side (latent side = this / 8)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast precision")
    p.add_argument("--modes", default="eager,compile,compile-cudagraphs",
                   help="comma list of eager, compile, compile-cudagraphs")
    p.add_argument("--iters", type=int, default=20, help="timed forward calls per mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed forward calls per mode (after compiling)")
    p.add_argument("--loop-steps", type=int, default=10, help="DDPM steps timed in the sampler-loop measurement "
                   "(0 = skip)")
    p.add_argument("--fid-steps", type=int, default=250, help="sampling steps assumed in the FID-50K projection")
    p.add_argument("--cfg", action="store_true", help="project with classifier-free guidance (2x batch per step)")
    p.add_argument("--vae", default="", help="local diffusers AutoencoderKL folder: also time decoding")
    p.add_argument("--out", default="", help="write the results as JSON to this file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sampling.py needs a CUDA GPU and none is visible; nothing was measured.", file=sys.stderr)
        sys.exit(2)
    cfg = JobConfig()
    cfg.engine.tf32 = True                      # as the official evaluation ran
    rt = init_runtime(cfg)                      # one process: the device, TF32, the attention kernel
    dev = rt.device
    latent = args.image_size // 8
    card = torch.cuda.get_device_name(dev)
    print(f"card: {card}; torch {torch.__version__}; model {args.model}; batch {args.batch}; {args.precision}")
    base = create_model(args.model, input_size=latent, attn_backend=rt.attn_backend).to(dev).eval().requires_grad_(False)
    C = base.in_channels
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(args.batch, C, latent, latent, device=dev, generator=g)
    t = torch.randint(0, 1000, (args.batch,), device=dev, generator=g)
    y = torch.randint(0, 1000, (args.batch,), device=dev, generator=g)
    flops = base.flops_per_sample()
    results = {"card": card, "torch": torch.__version__, "model": args.model, "batch": args.batch,
               "precision": args.precision, "modes": {}}

    def timed(fn, n):
        times = []
        for _ in range(n):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        return statistics.median(times)

    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode == "eager":
            net = base
        elif mode == "compile":
            net = torch.compile(base)
        elif mode == "compile-cudagraphs":
            net = torch.compile(base, mode="reduce-overhead")
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        fn = make_model_fn(net, num_classes=1000, precision=args.precision)
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(max(args.warmup, 3 if mode != "eager" else 1)):
                fn(x, t, y)
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - t0
            sec = timed(lambda: fn(x, t, y), args.iters)
        r = {"forward_img_per_s": args.batch / sec, "forward_ms": sec * 1e3, "warmup_compile_s": warm_s}
        if flops:
            r["forward_tflops"] = flops * args.batch / sec / 1e12
        if args.loop_steps > 0:
            sampler = build_sampler("ddpm", create_diffusion(""), steps=args.fid_steps)
            sp = sampler.process
            noise = IndexedNoise(range(args.batch), 0, dev)
            y_s = noise.labels(1000)
            z = noise.randn((C, latent, latent))
            with torch.no_grad():
                def loop():
                    xx = z
                    for i in range(args.loop_steps):
                        tt = torch.full((args.batch,), sp.num_timesteps - 1 - i, device=dev, dtype=torch.long)
                        xx = sp.p_sample(fn, xx, tt, model_kwargs={"y": y_s}, noise=noise(xx))["sample"]
                    return xx
                loop()
                torch.cuda.synchronize()
                sec_loop = timed(loop, 3)
            r["sampler_img_steps_per_s"] = args.batch * args.loop_steps / sec_loop
            rate = r["sampler_img_steps_per_s"]
        else:
            rate = r["forward_img_per_s"]
        mult = 2 if args.cfg else 1
        r["fid50k_gpu_hours"] = 50000 * args.fid_steps * mult / rate / 3600
        results["modes"][mode] = r
        print(f"[{mode}] forward {r['forward_img_per_s']:.0f} img/s ({r['forward_ms']:.1f} ms/batch"
              + (f", {r['forward_tflops']:.0f} TFLOP/s" if flops else "") + ")"
              + (f"; sampler loop {r['sampler_img_steps_per_s']:.0f} img-steps/s" if args.loop_steps else "")
              + f"; projected FID-50K at {args.fid_steps} steps{' with CFG' if args.cfg else ''}: "
              f"{r['fid50k_gpu_hours']:.2f} GPU-hours (warm-up/compile {warm_s:.0f} s)", flush=True)

    if args.vae:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True).to(dev).eval()
        dec = make_decoder(vae, 0.18215)
        zb = torch.randn(min(args.batch, 64), C, latent, latent, device=dev)
        with torch.no_grad():
            dec(zb)
            sec = timed(lambda: dec(zb), 5)
        results["vae_decode_img_per_s"] = zb.shape[0] / sec
        hours = 50000 / results["vae_decode_img_per_s"] / 3600
        print(f"[vae] decode {results['vae_decode_img_per_s']:.0f} img/s (+{hours:.3f} GPU-hours per 50K)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
