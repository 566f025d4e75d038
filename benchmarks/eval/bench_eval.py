#!/usr/bin/env python
"""Cost of the ADM evaluation of 50,000 samples: the Inception forward (FLOPs per image, images/s on the device),
the Fréchet distances and precision/recall, measured where it runs (GPU when there is one).

    python benchmarks/eval/bench_eval.py --out OUT/eval.json [--device cuda] [--batch 200] [--images 2000]
    python benchmarks/eval/bench_eval.py --smoke          # a few images on the CPU: checks the script

The network has the real graph's sizes with seeded random weights (the speed does not depend on the values).
Inception forward: float32, TF32 off (as the ADM protocol runs it), uint8 256 x 256 input resized in the graph
(the ADM evaluator feeds 256 x 256); FLOPs counted by torch's FlopCounterMode (convolutions and matmuls).
Precision/recall: ``--pr-samples`` random 2048-d features against 10,000 reference ones, ADM's fp16 blocks of
10,000. Writes a JSON that ``benchmarks/cost_report.py --eval-json`` reads, and prints a summary.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def inception_flops(side: int = 256) -> float:
    """Convolution + matmul FLOPs of one image through the graph (input resized to 299 x 299)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from usp_scale.eval.inception import FEATURES, Inception2015

    net = Inception2015()
    with FlopCounterMode(display=False) as fc:
        net(torch.zeros(1, 3, side, side, dtype=torch.uint8), FEATURES)
    return float(fc.get_total_flops())


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--batch", type=int, default=200, help="images per Inception forward")
    ap.add_argument("--images", type=int, default=2000, help="images timed (after one warm-up batch)")
    ap.add_argument("--pr-samples", type=int, default=50000, help="samples of the precision/recall timing")
    ap.add_argument("--pr-reference", type=int, default=10000, help="reference points of the timing")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script)")
    ap.add_argument("--out", default=None, help="JSON output")
    a = ap.parse_args(argv)
    import numpy as np
    import torch

    from usp_scale.eval import adm as A
    from usp_scale.eval.inception import FEATURES, random_inception

    if a.smoke:
        a.device, a.batch, a.images, a.pr_samples, a.pr_reference = "cpu", 2, 2, 300, 200
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    res = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device)
           if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} threads)", "torch": torch.__version__,
           "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    res["inception_flops_per_image"] = inception_flops()
    net = random_inception(0, calibrate_images=2).to(device)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (a.batch, 3, 256, 256), generator=g, dtype=torch.uint8).to(device)
    with torch.no_grad():
        net(batch, FEATURES)                                   # warm-up
        _sync(device)
        t0 = time.perf_counter()
        done = 0
        while done < a.images:
            net(batch, FEATURES)
            done += a.batch
        _sync(device)
    dt = time.perf_counter() - t0
    res.update(inception_batch=a.batch, inception_images=done, inception_img_per_s=done / dt,
               inception_tflops=done * res["inception_flops_per_image"] / dt / 1e12)
    # Fréchet distances (float64 on the CPU, as the evaluator computes them), 2048-d and 2023-d
    rng = np.random.RandomState(0)
    for name, d in (("fid", 2048), ("sfid", 2023)):
        if a.smoke:
            d = 64
        x, y = rng.randn(4 * d, d), rng.randn(4 * d, d) + 0.1
        s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        t0 = time.perf_counter()
        A.frechet_distance(x.mean(0), s1, y.mean(0), s2)
        res[f"{name}_seconds"] = time.perf_counter() - t0
    # precision/recall at the evaluation's size
    fs = torch.rand(a.pr_samples, 2048, generator=g)
    fr = torch.rand(a.pr_reference, 2048, generator=g)
    _sync(device)
    t0 = time.perf_counter()
    A.precision_recall(fs, fr, device=device)
    _sync(device)
    res.update(pr_samples=a.pr_samples, pr_reference=a.pr_reference, pr_seconds=time.perf_counter() - t0)
    # distances: radii of both sets (N^2 + R^2) and the cross block (N R); scaled to 50,000 x 10,000
    work = a.pr_samples ** 2 + a.pr_reference ** 2 + a.pr_samples * a.pr_reference
    res["pr_50k_seconds"] = res["pr_seconds"] * (50000 ** 2 + 10000 ** 2 + 50000 * 10000) / work
    res["eval_50k_seconds"] = (60000 / res["inception_img_per_s"] + res["fid_seconds"] + res["sfid_seconds"]
                               + res["pr_50k_seconds"])
    print(f"{res['device']}: Inception {res['inception_flops_per_image'] / 1e9:.2f} GFLOP/img, "
          f"{res['inception_img_per_s']:.1f} img/s at batch {a.batch} ({res['inception_tflops']:.2f} TFLOP/s); "
          f"FID {res['fid_seconds']:.1f} s, sFID {res['sfid_seconds']:.1f} s; precision/recall "
          f"{a.pr_samples} x {a.pr_reference}: {res['pr_seconds']:.1f} s; a 50K evaluation (60,000 forwards): "
          f"{res['eval_50k_seconds'] / 60:.1f} min")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
