#!/usr/bin/env python
"""Where the time of one training step goes: device-kernel time by category and the top kernels.

    python benchmarks/train/profile_step.py --models MAE-XL@256,DiT-XL/2@128 --kernels torch,auto --out OUT
    python benchmarks/train/profile_step.py --smoke --out /tmp/prof      # tiny models on the CPU: checks the script

Runs the same step as bench_step.py (forward, backward, grad norm, fused AdamW) a few times under
torch.profiler and sums the self time of every device kernel (CUDA on a GPU; CPU ops on the CPU, where the
numbers only check the script). Kernels are put into categories by name — matmul, attention, ours (usp_scale's Triton kernels),
triton (Inductor's), norm, elementwise/reduce, optimizer, copy/cast, other — so the share of the step outside
the matrix products, which the fused kernels must win back (kernels issue item 5), is read off directly.
Writes OUT/profile_<model>_<kernels>_<mode>.md (category table, top kernels) and a JSON with the same numbers;
``--trace`` also writes a Chrome trace.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_step import KERNELS, MODELS, SMOKE_MODELS, _comma_list, make_step, model_specs  # noqa: E402
from usp_scale.config import JobConfig  # noqa: E402
from usp_scale.runtime import init_runtime  # noqa: E402

# (category, regex on the kernel name), first match wins
CATEGORIES = [
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|attn)|_efficient_attention"),
    ("matmul", r"gemm|cutlass|xmma|cublas|sm90_|sm80_|nvjet|matmul|addmm|aten::mm|aten::bmm|linear|conv"),
    ("optimizer", r"adam|multi_tensor|foreach|lerp"),
    ("ours", r"^_\w+_kernel$"),               # usp_scale's Triton kernels (kernels/*.py: _name_kernel)
    ("triton", r"^triton"),                    # Inductor's generated kernels
    ("norm", r"layer_norm|layernorm|rms_norm|batch_norm"),
    ("copy/cast", r"copy|cast|convert|memcpy|memset|to_copy|cat|index|gather|scatter|fill"),
    ("elementwise/reduce", r"elementwise|vectorized|reduce|unrolled|softmax|gelu|mul|add|sum|norm"),
]


def categorize(name: str) -> str:
    low = name.lower()
    for cat, rx in CATEGORIES:
        if re.search(rx, low):
            return cat
    return "other"


def summarize(events, steps: int, device_type: str) -> dict:
    """Per-step device self time (ms) by category and by kernel name, from ``prof.key_averages()``."""
    by_cat, by_name = defaultdict(float), {}
    for ev in events:
        if device_type == "cuda":
            us = getattr(ev, "self_device_time_total", None)
            if us is None:
                us = getattr(ev, "self_cuda_time_total", 0.0)
            if ev.device_type != torch.autograd.DeviceType.CUDA and us == 0:
                continue
        else:
            if ev.key.startswith("ProfilerStep") or "autograd::engine" in ev.key:
                continue
            us = ev.self_cpu_time_total
        if us <= 0:
            continue
        ms = us / 1000.0 / steps
        by_cat[categorize(ev.key)] += ms
        by_name[ev.key] = by_name.get(ev.key, 0.0) + ms
    total = sum(by_cat.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:30]
    return {"total_ms": total,
            "categories": {k: {"ms": v, "share": v / total if total else 0.0}
                           for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n, "ms": ms, "share": ms / total if total else 0.0, "category": categorize(n)}
                    for n, ms in top]}


def to_markdown(title: str, s: dict) -> str:
    lines = [f"# {title}", "", f"device time per step: {s['total_ms']:.3f} ms", "",
             "| category | ms/step | share |", "|---|---|---|"]
    lines += [f"| {k} | {v['ms']:.3f} | {100 * v['share']:.1f} % |" for k, v in s["categories"].items()]
    lines += ["", "| kernel | category | ms/step | share |", "|---|---|---|---|"]
    lines += [f"| `{t['name'][:110]}` | {t['category']} | {t['ms']:.3f} | {100 * t['share']:.1f} % |" for t in s["top"]]
    return "\n".join(lines) + "\n"


def profile_one(short: str, *, batch: int, compile_: bool, kernels: str, precision: str, runtime, warmup: int,
                steps: int, out: str, trace: bool) -> dict:
    device = runtime.device
    step, _, flops, reg = make_step(short, batch=batch, compile_=compile_, kernels=kernels, precision=precision,
                                    runtime=runtime, ac=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync()
    s = summarize(prof.key_averages(), steps, device.type)
    mode = "compiled" if compile_ else "eager"
    tag = f"{short.replace('/', '_')}_{kernels}_{mode}"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    title = (f"{short} ({reg}), batch {batch}, kernels={kernels}, {mode}, {precision} — {dev}, "
             f"torch {torch.__version__}")
    s.update(model=short, batch=batch, kernels=kernels, mode=mode, device=dev, torch=torch.__version__,
             train_flops_per_sample=flops)
    with open(os.path.join(out, f"profile_{tag}.md"), "w") as f:
        f.write(to_markdown(title, s))
    with open(os.path.join(out, f"profile_{tag}.json"), "w") as f:
        json.dump(s, f, indent=1)
    if trace:
        prof.export_chrome_trace(os.path.join(out, f"trace_{tag}.json"))
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="MAE-XL@256,DiT-XL/2@128",
                    help=f"comma list of {', '.join(MODELS)}; NAME@BATCH sets that model's batch size")
    ap.add_argument("--batch", type=int, default=128, help="batch size of models given without @BATCH")
    ap.add_argument("--kernels", default="torch,auto", help=f"comma list of {', '.join(KERNELS)}")
    ap.add_argument("--compile", choices=["eager", "compiled", "both"], default="eager",
                    help="profile the eager step, the whole-model compiled step, or both")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    ap.add_argument("--warmup", type=int, default=3, help="steps before profiling (compilation happens here)")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (times are per step)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--out", required=True, help="folder for profile_*.md / *.json (created)")
    ap.add_argument("--trace", action="store_true", help="also write a Chrome trace per run (large)")
    ap.add_argument("--smoke", action="store_true", help=f"check the script: {SMOKE_MODELS}, batch 2, 1+1 steps")
    a = ap.parse_args(argv)
    if a.smoke:
        a.models, a.batch, a.warmup, a.steps = SMOKE_MODELS, 2, 1, 1
    specs = model_specs(a.models, a.batch)
    kernels = _comma_list(a.kernels, KERNELS, "kernels")
    base = JobConfig()
    base.engine.tf32 = a.device == "cuda"   # TF32 on a GPU, as bench_step.py
    runtime = init_runtime(base, device=a.device)
    device = runtime.device
    os.makedirs(a.out, exist_ok=True)
    modes = {"eager": [False], "compiled": [True], "both": [False, True]}[a.compile]
    failed = 0
    for short, batch in specs:
        for k in kernels:
            for c in modes:
                try:
                    s = profile_one(short, batch=batch, compile_=c, kernels=k, precision=a.precision, runtime=runtime,
                                    warmup=a.warmup, steps=a.steps, out=a.out, trace=a.trace)
                except Exception as e:  # noqa: BLE001 -- keep profiling the other settings
                    if a.smoke:
                        raise
                    print(f"FAILED {short} kernels={k} compile={c}: {type(e).__name__}: {e}", flush=True)
                    failed += 1
                    continue
                cats = ", ".join(f"{n} {100 * v['share']:.0f}%" for n, v in s["categories"].items())
                print(f"{short} kernels={k} {'compiled' if c else 'eager'}: {s['total_ms']:.2f} ms/step device; "
                      f"{cats}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
