#!/usr/bin/env python
"""Throughput of one training step (local engine, synthetic latents): samples/s, MFU, peak memory.

    python benchmarks/train/bench_step.py --models MAE-XL@256,DiT-XL/2@128 --compile both --kernels torch,auto
    python benchmarks/train/bench_step.py --smoke        # tiny real models on CPU or GPU: checks the script

Each row runs the real task loss (MAE masked loss, DDPM / SiT training losses) through the same
engine the trainer uses, with bf16 autocast on GPU, on a batch from the ``data.format=synthetic``
loader. Every model is timed with each ``--kernels`` choice (``torch`` = the reference path the
official code computes, ``auto`` / ``triton`` = the Triton kernels) and each ``--compile`` mode, and the
speed-up over torch-eager is printed. The step is what the trainer runs: forward, backward, global grad
norm, fused AdamW (non-finite steps skipped on the device, no host sync per step); on a GPU one step after the
warm-up runs under torch.cuda.set_sync_debug_mode("warn") and the synchronisations it makes are counted
(``host_syncs_per_step``, expected 0). MFU = 3 x forward FLOPs (model.flops_per_sample) x samples/s / peak.
Rows are appended to a CSV with date, card, torch version and settings. Anchors (official code, H200,
bf16): MAE-XL 1,777 img/s eager, 2,176 compiled; DiT-XL/2 358 eager, 577 compiled
(docs/anchors.md §G).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from usp_scale.config import JobConfig  # noqa: E402
from usp_scale.config.validate import schema_choices  # noqa: E402
from usp_scale.data import build_loader  # noqa: E402
from usp_scale.engine import build_engine  # noqa: E402
from usp_scale.runtime import init_runtime, seed_all  # noqa: E402
from usp_scale.training.optim import build_optimizer  # noqa: E402
from usp_scale.training.tasks import build_task  # noqa: E402

# Short names -> (task, registry name, latent side)
MODELS = {
    "MAE-B": ("pretrain", "vit_base_patch_vae", 28), "MAE-L": ("pretrain", "vit_large_patch_vae", 28),
    "MAE-XL": ("pretrain", "vit_xlarge_patch_vae", 28),
    "DiT-B/2": ("dit", "DiT-B/2", 32), "DiT-L/2": ("dit", "DiT-L/2", 32), "DiT-XL/2": ("dit", "DiT-XL/2", 32),
    "SiT-B/2": ("sit", "SiT-B/2", 32), "SiT-L/2": ("sit", "SiT-L/2", 32), "SiT-XL/2": ("sit", "SiT-XL/2", 32),
    "MAE-tiny": ("pretrain", "vit_tiny_patch_vae", 8), "DiT-tiny/2": ("dit", "DiT-tiny/2", 8),
    "SiT-tiny/2": ("sit", "SiT-tiny/2", 8),
}
SMOKE_MODELS = "MAE-tiny,DiT-tiny/2,SiT-tiny/2"
KERNELS = ("torch", "auto", "triton")


def synthetic_batch(cfg, device) -> dict:
    """One batch from the data.format=synthetic loader (the model's latent shape), kept on device."""
    cfg.data.format, cfg.data.synthetic_samples, cfg.data.num_classes = "synthetic", cfg.data.batch_size, 1000
    m = cfg.model
    loader = build_loader(cfg.data, cfg.vae, seed=cfg.seed, device=device,
                          latent_shape=(m.in_chans, m.img_size, m.img_size), num_classes=m.num_classes)
    return next(iter(loader))


def make_step(short: str, *, batch: int, compile_: bool, kernels: str, precision: str, runtime, ac: bool,
              fp8: str = "off"):
    """Build model, engine and one on-device synthetic batch for ``short``; returns (step_fn, engine, train FLOPs
    per sample, registry name). ``step_fn()`` runs forward, backward and the optimizer step as the trainer does."""
    device = runtime.device
    task_name, reg, side = MODELS[short]
    cfg = JobConfig()
    cfg.task, cfg.model.name, cfg.model.img_size, cfg.model.kernels = task_name, reg, side, kernels
    cfg.engine.name, cfg.engine.precision, cfg.engine.compile = "local", precision, compile_
    cfg.engine.activation_checkpointing = ac
    cfg.engine.fp8 = fp8
    cfg.optim.lr = 1e-4
    cfg.data.batch_size = batch
    task = build_task(cfg)
    seed_all(0)
    model = task.build_model(attn_backend=runtime.attn_backend)  # the kernel init_runtime chose, as in the trainer
    flops = task.train_flops_per_sample(model)
    eng = build_engine(cfg.engine, model, lambda m: build_optimizer(cfg.optim, task.param_groups(m), device),
                       device=device, micro_batch=batch)
    batch_d = synthetic_batch(cfg, device)

    def step():
        with eng.sync_context(), eng.autocast():
            loss = task.loss(eng, batch_d)
        eng.backward(loss)
        return eng.step()

    return step, eng, flops, reg


def bench_one(short: str, *, batch: int, compile_: bool, kernels: str, steps: int, warmup: int, precision: str,
              runtime, peak: float, ac: bool, fp8: str = "off") -> dict:
    device = runtime.device
    step, eng, flops, reg = make_step(short, batch=batch, compile_=compile_, kernels=kernels, precision=precision,
                                      runtime=runtime, ac=ac, fp8=fp8)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_c = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t_c
    syncs = ""
    if device.type == "cuda":       # count the step's host<->device synchronisations (expected: 0)
        import warnings

        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        res = step()
    sync()
    dt = time.perf_counter() - t0
    sps = batch * steps / dt
    return {"model": short, "registry": reg, "batch": batch, "compile": compile_, "kernels": kernels, "fp8": fp8,
            "ac": ac,
            "precision": eng.precision, "samples_per_s": round(sps, 2), "step_ms": round(1000 * dt / steps, 2),
            "mfu": round(flops * sps / peak, 4) if flops else "", "train_gflop_per_sample": round(flops / 1e9, 2)
            if flops else "", "max_mem_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            if device.type == "cuda" else "", "host_syncs_per_step": syncs, "warmup_s": round(warm_s, 1), "grad_norm": round(res.grad_norm, 4)}


def _comma_list(s: str, known, what: str) -> list:
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in known]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {bad or s!r}; use a comma list of {', '.join(known)}")
    return items


def model_specs(text: str, default_batch: int) -> list:
    """``--models`` "NAME[@BATCH],..." -> [(name, batch)], NAME checked against MODELS, BATCH defaulting to
    ``default_batch`` (NAME@BATCH gives one model its own batch size, e.g. the official anchors' MAE-XL@256)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    names = _comma_list(",".join(x.partition("@")[0] for x in items), MODELS, "models")
    specs = []
    for name, item in zip(names, items):
        batch = item.partition("@")[2]
        if batch and not (batch.isdigit() and int(batch) > 0):
            raise SystemExit(f"--models {item!r}: the batch size after @ must be a positive integer")
        specs.append((name, int(batch) if batch else default_batch))
    return specs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="MAE-XL@256,DiT-XL/2@128",
                    help=f"comma list of {', '.join(MODELS)}; NAME@BATCH sets that model's batch size "
                         "(default: the batch sizes of the official H200 anchors)")
    ap.add_argument("--batch", type=int, default=128, help="per-device batch size of models given without @BATCH")
    ap.add_argument("--compile", choices=["eager", "compiled", "both"], default="both",
                    help="run eager, torch.compile'd blocks, or both")
    ap.add_argument("--kernels", default="torch,auto",
                    help="comma list of torch (reference path), auto (Triton where measured faster), triton "
                         "(all Triton kernels); each model is timed with each (model.kernels)")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing of every block")
    ap.add_argument("--fp8", default="off",
                    help="comma list of engine.fp8 settings to time (off, tensorwise, rowwise, rowwise_with_gw_hp; "
                         "needs torchao)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--peak-flops", type=float, default=989.4e12, help="dense bf16 peak FLOP/s of the device")
    ap.add_argument("--smoke", action="store_true",
                    help=f"check the script: {SMOKE_MODELS}, batch <= 4, 2 steps after 1 warm-up, eager")
    ap.add_argument("--csv", default="benchmarks/reports/train_step.csv", help="append results here ('' = none)")
    a = ap.parse_args(argv)
    if a.smoke:
        if a.models == ap.get_default("models"):
            a.models = SMOKE_MODELS
        a.batch, a.steps, a.warmup = min(a.batch, 4), 2, 1
        a.models = ",".join(m.split("@")[0] for m in a.models.split(","))
        if a.compile == "both":
            a.compile = "eager"
    # NAME@BATCH gives one model its own batch size (the official anchors: MAE-XL at 256, DiT-XL/2 at 128).
    specs = model_specs(a.models, a.batch)
    kernels = _comma_list(a.kernels, KERNELS, "kernels")
    fp8s = _comma_list(a.fp8, schema_choices()["engine.fp8"], "fp8")
    base = JobConfig()
    base.engine.tf32 = a.device == "cuda"   # TF32 on a GPU, as the official benchmarks ran
    runtime = init_runtime(base, device=a.device)   # one process: device, TF32, the attention kernel
    device = runtime.device
    if device.type != "cuda" and "triton" in kernels and os.environ.get("TRITON_INTERPRET") != "1":
        print("--kernels triton: skipped on CPU (Triton needs CUDA, or TRITON_INTERPRET=1 for a slow check)")
        kernels = [k for k in kernels if k != "triton"]
    modes = {"eager": [False], "compiled": [True], "both": [False, True]}[a.compile]
    meta = {"date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__}
    rows, failed = [], []
    for short, batch in specs:
        base = None
        for k in kernels:
            for f8 in fp8s:
                for c in modes:
                    if c and k == "auto" and "torch" in kernels:
                        # under torch.compile "auto" is the torch reference (kernels/dispatch.py): same step
                        print(f"{short} auto compiled = torch compiled (auto leaves fusion to Inductor): skipped")
                        continue
                    try:
                        row = {**meta, **bench_one(short, batch=batch, compile_=c, kernels=k,
                                                   steps=a.steps, warmup=a.warmup, precision=a.precision,
                                                   runtime=runtime, peak=a.peak_flops, ac=a.ac, fp8=f8)}
                    except Exception as e:  # noqa: BLE001 -- one failing setting must not cost the other rows
                        if a.smoke:
                            raise
                        import traceback

                        traceback.print_exc()
                        print(f"FAILED {short} kernels={k} fp8={f8} compile={c}: {type(e).__name__}: {e}", flush=True)
                        failed.append(f"{short}/{k}/{f8}/{'compiled' if c else 'eager'}")
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    if k == "torch" and not c and f8 == "off":
                        base = row["samples_per_s"]
                    row["vs_torch_eager"] = round(row["samples_per_s"] / base, 3) if base else ""
                    print(row, flush=True)
                    rows.append(row)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    print(f"\n{'model':>12} {'kernels':>7} {'fp8':>10} {'mode':>8} {'samples/s':>10} {'ms/step':>8} {'x torch-eager':>13} {'syncs':>5}")
    for r in rows:
        print(f"{r['model']:>12} {r['kernels']:>7} {r['fp8']:>10} {'compiled' if r['compile'] else 'eager':>8} "
              f"{r['samples_per_s']:>10.1f} {r['step_ms']:>8.2f} {r['vs_torch_eager']!s:>13} "
              f"{r['host_syncs_per_step']!s:>5}")
    if a.csv and rows:
        os.makedirs(os.path.dirname(os.path.abspath(a.csv)), exist_ok=True)
        new = not os.path.exists(a.csv)
        with open(a.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    if failed:
        print(f"{len(failed)} setting(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
