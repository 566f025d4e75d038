#!/usr/bin/env python
"""The main job's last step: what its FID / IS mean, next to reference values, and one summary file.

Reads the samples' metrics (written by launchers/evaluate.py) and computes the same metrics, with the same
feature extractor and reference (the val split), for three other image sets of the same size:

* ``real``: images of the train split (what a perfect generator would score: the floor of FID);
* ``noise``: uniform random pixels (the ceiling);
* ``vae_random_latents``: the VAE decoding N(0, 1) latents (what the decoder gives without a trained model).

Prints a table, writes OUT/summary.json (these numbers, the linear probe's top-1, the losses' first and last
values) and exits non-zero when the samples do not beat both baselines (FID lower than noise's and the random
latents'), so a broken pipeline fails the main job.

    python launchers/tiny_report.py --run runs/tiny --data runs/tiny/data
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="main job output folder (holds samples/, pretrain/, dit/, linprobe/)")
    p.add_argument("--data", required=True, help="synthetic dataset root (train/ and val/)")
    p.add_argument("--vae", default="synthetic-f8", help="VAE for the random-latents baseline (default synthetic-f8)")
    p.add_argument("--image-size", type=int, default=64, help="image side of the samples (default 64)")
    p.add_argument("--feature-extractor", default="usp-synthetic", help="extractor (default usp-synthetic)")
    p.add_argument("--metrics", nargs="+", default=["fid", "is", "kid", "pr"], help="metrics (default fid is kid pr)")
    p.add_argument("--seed", type=int, default=0, help="seed of the baselines' images")
    p.add_argument("--out", default=None, help="summary file (default RUN/summary.json)")
    return p


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def baselines(data: str, n: int, size: int, vae_path: str, seed: int):
    """{name: uint8 (n, size, size, 3)} for the reference sets."""
    import numpy as np
    import torch

    from usp_scale.data.synthetic import load_split
    from usp_scale.vae import FrozenVAE

    rng = np.random.default_rng(seed)
    xtr, _ = load_split(data, "train")
    real = xtr[np.sort(rng.choice(len(xtr), size=min(n, len(xtr)), replace=False))]
    noise = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    vae = FrozenVAE(path=vae_path)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n,) + vae.latent_shape(size), generator=g)
    dec = ((vae.decode(z) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return {"real": real, "noise": noise, "vae_random_latents": dec}


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from usp_scale.eval import compute_metrics

    run = a.run
    val = os.path.join(a.data, "val")
    rec = _jsonl(os.path.join(run, "samples", "metrics.jsonl"))
    samples = {r["metric"]: r["value"] for r in rec}
    n = int(rec[-1]["num_samples"])
    keys = ("fid", "is_mean", "kid_mean", "precision", "recall")
    table = {"samples": {k: samples[k] for k in keys if k in samples}}
    for name, images in baselines(a.data, n, a.image_size, a.vae, a.seed).items():
        r = compute_metrics(images, val, a.metrics, a.feature_extractor, progress=False)
        table[name] = {k: r[k] for k in keys if k in r}
    probe = [r for r in _jsonl(os.path.join(run, "linprobe", "metrics.jsonl")) if r.get("kind") == "eval"]
    summary = {"feature_extractor": a.feature_extractor, "num_images": n, "reference": val, "metrics": table,
               "linprobe_top1": probe[-1]["top1"] if probe else None,
               "linprobe_chance": 100.0 / len(os.listdir(val))}
    for stage in ("pretrain", "dit"):
        losses = [r["loss"] for r in _jsonl(os.path.join(run, stage, "metrics.jsonl")) if r.get("kind") == "train"]
        summary[f"{stage}_loss_first_last"] = [losses[0], losses[-1]]
    print(f"\nFID / IS / KID / precision / recall vs the val split ({n} images each, extractor "
          f"{a.feature_extractor}: these numbers hold for this synthetic dataset only)")
    print(f"{'images':22s} {'FID':>8s} {'IS':>6s} {'KID':>8s} {'prec':>6s} {'recall':>6s}")
    for name, r in table.items():
        print(f"{name:22s} {r.get('fid', float('nan')):8.3f} {r.get('is_mean', float('nan')):6.2f} "
              f"{r.get('kid_mean', float('nan')):8.4f} {r.get('precision', float('nan')):6.2f} "
              f"{r.get('recall', float('nan')):6.2f}")
    print(f"linear probe top-1 on val: {summary['linprobe_top1']:.1f} % (chance {summary['linprobe_chance']:.0f} %)")
    out = a.out or os.path.join(run, "summary.json")
    from usp_scale.fileio import write_json
    write_json(out, summary)
    print(f"summary: {out}")
    fid = table["samples"]["fid"]
    worse = [b for b in ("noise", "vae_random_latents") if not fid < table[b]["fid"]]
    if worse:
        print(f"FAILED: the samples' FID {fid:.3f} is not below the {' and '.join(worse)} baseline", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
