#!/usr/bin/env python3
"""Training-step throughput of the USP models: eager vs compiled, torch reference vs Triton kernels.

Measures one optimizer step (forward, backward, fused AdamW) on random latents of the paper's
shapes and reports samples/s, step time, peak memory and MFU (forward FLOPs x 3 against a
dense peak). The baseline is this project's own torch reference path (what the official code
computes), eager and compiled, measured in the same run.

  python benchmarks/e2e/bench_step.py --model vit_xlarge_patch_vae --batch 64          # MAE-XL, GPU
  python benchmarks/e2e/bench_step.py --model DiT-XL/2 --batch 32 --img-size 32        # DiT-XL/2, GPU
  python benchmarks/e2e/bench_step.py --smoke                                           # tiny, any device

Results are printed as a table and appended as CSV rows (with device, versions and date) to
--csv. Anchors (official code, H200, bf16): MAE-XL 1,777 img/s eager, 2,176 compiled;
DiT-XL/2 358 img/s eager, 577 compiled (shared/design/performance-anchors.md).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_xlarge_patch_vae", help="registry name")
    p.add_argument("--batch", type=int, default=64, help="per-device batch size")
    p.add_argument("--img-size", type=int, default=None, help="latent side (default: 28 for MAE, 32 for DiT/SiT)")
    p.add_argument("--variants", default="eager-torch,compile-torch,eager-triton,compile-triton",
                   help="comma list of {eager,compile}-{torch,triton}")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "fp16"], help="autocast dtype")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation happens here)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak of one device for MFU")
    p.add_argument("--csv", default="benchmarks/reports/bench_step.csv", help="CSV file to append rows to")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps: checks the script on any device")
    return p.parse_args(argv)


def build(name, img_size, kernels, device):
    from usp_scale.models import create_model, model_family

    fam = model_family(name)
    kw = {"kernels": kernels}
    if fam == "mae":
        kw.update(img_size=img_size or 28, norm_pix_loss=True)
    elif fam in ("dit", "sit"):
        kw.update(input_size=img_size or 32)
    else:
        kw.update(img_size=img_size or 28)
    return create_model(name, **kw).to(device), fam


def step_fn(model, fam, batch, device):
    C = 4
    side = model.patch_embed.img_size if fam in ("mae", "vit") else model.x_embedder.img_size
    x = torch.randn(batch, C, side, side, device=device)
    classes = model.num_classes if fam == "vit" else getattr(getattr(model, "y_embedder", None), "num_classes", 1000)
    y = torch.randint(0, classes, (batch,), device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    if fam == "mae":
        return lambda m: m(x, 0.75)[0]
    if fam in ("dit", "sit"):
        return lambda m: (m(x, t, y) ** 2).mean()
    return lambda m: torch.nn.functional.cross_entropy(m(x), y)


def run_variant(args, variant, device):
    mode, kernels = variant.split("-")
    if kernels == "triton" and device.type != "cuda":
        return None
    torch.manual_seed(0)
    model, fam = build(args.model, args.img_size, kernels, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=device.type == "cuda")
    fwd = step_fn(model, fam, args.batch, device)
    runner = torch.compile(model) if mode == "compile" else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]

    def one():
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision != "fp32"):
            loss = fwd(runner)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        one()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = one()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    flops = 3 * model.flops_per_sample() * args.batch
    return {
        "variant": variant, "samples_per_s": args.batch / dt, "step_ms": dt * 1e3,
        "mfu": flops / dt / (args.peak_tflops * 1e12),
        "max_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan"),
        "loss": float(loss.detach()),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        args.model = "vit_tiny_patch_vae" if args.model == "vit_xlarge_patch_vae" else args.model
        args.batch, args.warmup, args.steps = min(args.batch, 4), 1, 2
        args.variants = "eager-torch"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("bench_step.py measures GPU throughput; on a CPU run it with --smoke to check the script")
    card = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    rows = []
    for v in args.variants.split(","):
        r = run_variant(args, v.strip(), device)
        if r is None:
            print(f"{v}: skipped (Triton kernels need CUDA)")
            continue
        rows.append(r)
        print(f"{args.model:>24} {v:>15}  {r['samples_per_s']:9.1f} samples/s  {r['step_ms']:8.2f} ms/step  "
              f"MFU {100 * r['mfu']:5.1f}%  mem {r['max_mem_gib']:.1f} GiB")
    base = next((r for r in rows if r["variant"] == "eager-torch"), None)
    if base:
        for r in rows:
            print(f"  {r['variant']:>15}: {r['samples_per_s'] / base['samples_per_s']:.2f}x eager-torch")
    meta = {"date": datetime.date.today().isoformat(), "device": card, "torch": torch.__version__,
            "model": args.model, "batch": args.batch, "precision": args.precision}
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(meta) + list(rows[0]) if rows else list(meta))
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**meta, **r})
    return rows


if __name__ == "__main__":
    main()
