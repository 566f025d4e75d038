#!/usr/bin/env python
"""Throughput of one training step (local engine, synthetic latents): samples/s, MFU, peak memory.

    python benchmarks/train/bench_step.py --models MAE-XL,DiT-XL/2 --batch 128 --compile both
    python benchmarks/train/bench_step.py --models toy_mae --device cpu --steps 3 --warmup 1   # smoke run

Each row runs the real task loss (MAE masked loss, DDPM / SiT training losses) through the same
engine the trainer uses, with bf16 autocast on GPU. MFU = 3 x forward FLOPs (model.flops_per_sample)
x samples/s / peak. Results are appended to a CSV with the card, torch version and settings.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

# Short names -> (task, registry name, latent side)
MODELS = {
    "MAE-B": ("pretrain", "vit_base_patch_vae", 28), "MAE-L": ("pretrain", "vit_large_patch_vae", 28),
    "MAE-XL": ("pretrain", "vit_xlarge_patch_vae", 28),
    "DiT-B/2": ("dit", "DiT-B/2", 32), "DiT-L/2": ("dit", "DiT-L/2", 32), "DiT-XL/2": ("dit", "DiT-XL/2", 32),
    "SiT-B/2": ("sit", "SiT-B/2", 32), "SiT-L/2": ("sit", "SiT-L/2", 32), "SiT-XL/2": ("sit", "SiT-XL/2", 32),
    "toy_mae": ("pretrain", "toy_mae", 8), "toy_dit": ("dit", "toy_dit", 8),
}


def bench_one(short: str, *, batch: int, compile_: bool, steps: int, warmup: int, precision: str, device,
              peak: float, toy_losses: bool, ac: bool) -> dict:
    from usp_scale.config import JobConfig
    from usp_scale.engine import build_engine
    from usp_scale.training.optim import build_optimizer
    from usp_scale.training.tasks import build_task

    task_name, reg, side = MODELS[short]
    cfg = JobConfig()
    cfg.task, cfg.model.name, cfg.model.img_size = task_name, reg, side
    cfg.engine.name, cfg.engine.precision, cfg.engine.compile = "local", precision, compile_
    cfg.engine.activation_checkpointing = ac
    cfg.optim.lr = 1e-4
    kw = {}
    if task_name in ("dit", "sit") and toy_losses:
        from usp_scale.training.toy import ToyDiffusion, ToyTransport

        kw = {"diffusion": ToyDiffusion()} if task_name == "dit" else {"transport": ToyTransport()}
    task = build_task(cfg, **kw)
    torch.manual_seed(0)
    model = task.build_model()
    flops = task.train_flops_per_sample(model)
    eng = build_engine(cfg.engine, model, lambda m: build_optimizer(cfg.optim, task.param_groups(m), device),
                       device=device, micro_batch=batch)
    x = torch.randn(batch, cfg.model.in_chans, side, side, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    batch_d = {"latents": x, "labels": y}

    def step():
        with eng.sync_context(), eng.autocast():
            loss = task.loss(eng, batch_d)
        eng.backward(loss)
        return eng.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_c = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t_c
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        res = step()
    sync()
    dt = time.perf_counter() - t0
    sps = batch * steps / dt
    return {"model": short, "registry": reg, "batch": batch, "compile": compile_, "ac": ac, "precision":
            eng.precision, "samples_per_s": round(sps, 2), "step_ms": round(1000 * dt / steps, 2),
            "mfu": round(flops * sps / peak, 4) if flops else "", "train_gflop_per_sample": round(flops / 1e9, 2)
            if flops else "", "max_mem_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            if device.type == "cuda" else "", "warmup_s": round(warm_s, 1), "grad_norm": round(res.grad_norm, 4),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "losses": "toy" if toy_losses and task_name != "pretrain" else "real"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="MAE-XL,DiT-XL/2", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--batch", type=int, default=128, help="per-device batch size")
    ap.add_argument("--compile", choices=["eager", "compiled", "both"], default="both",
                    help="run eager, torch.compile'd blocks, or both")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing of every block")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--peak-flops", type=float, default=989.4e12, help="dense bf16 peak FLOP/s of the device")
    ap.add_argument("--toy-losses", action="store_true",
                    help="use the toy DDPM/SiT losses (when usp_scale.diffusion / transport are unavailable)")
    ap.add_argument("--csv", default="benchmarks/reports/train_step.csv", help="append results here ('' = none)")
    a = ap.parse_args(argv)
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device(a.device)
    modes = {"eager": [False], "compiled": [True], "both": [False, True]}[a.compile]
    rows = []
    for short in [m.strip() for m in a.models.split(",") if m.strip()]:
        if short not in MODELS:
            print(f"unknown model {short!r}; known: {', '.join(MODELS)}", file=sys.stderr)
            return 2
        for c in modes:
            row = bench_one(short, batch=a.batch, compile_=c, steps=a.steps, warmup=a.warmup, precision=a.precision,
                            device=device, peak=a.peak_flops, toy_losses=a.toy_losses, ac=a.ac)
            print(row, flush=True)
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if a.csv:
        os.makedirs(os.path.dirname(os.path.abspath(a.csv)), exist_ok=True)
        new = not os.path.exists(a.csv)
        with open(a.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
