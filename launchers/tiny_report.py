#!/usr/bin/env python
"""The main job's last step (launchers/run_tiny.sh, and launchers/run_tiny_lightning.sh with --vae synthetic-f16
--vae-version f16d32 --latent-stats CACHE --model-name LightningDiT): its numbers beside their baselines and
reference values, and one summary file.

Reads the metrics of the USP-initialised DiT's samples and of the same DiT trained from scratch for the same steps
(``samples/`` and ``samples_scratch/``, written by launchers/evaluate.py), and computes the same metrics, with the
same feature extractor and reference (the val split), for three other image sets of the same size:

* ``real``: images of the train split (what a perfect generator would score: the floor of FID);
* ``noise``: uniform random pixels (the ceiling);
* ``vae_random_latents``: the VAE decoding N(0, 1) latents (what the decoder gives without a trained model; with
  ``--latent-stats``, N(0, 1) in the normalised space, decoded through the channel statistics as samples are).

Prints a table and the linear probe of the pretrained encoder beside the same probe of the encoder randomly
initialised, says in one line each whether USP beat its baseline, writes OUT/summary.json (these numbers, the
losses' first and last values, the settings every stage ran with (OUT/stages/), the commit and the wall time) and
exits non-zero when the samples do not beat the noise baselines (FID lower than noise's and the random latents'),
so a broken pipeline fails the main job. Losing to a baseline is reported, not an error.

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
    p.add_argument("--vae-version", default="d8", help="its vae.version (default d8; f16d32 for synthetic-f16)")
    p.add_argument("--latent-stats", default="", help="its channel statistics (vae.latent_stats: a latent cache "
                   "folder), for f16d32: the random latents are N(0, 1) in the normalised space, decoded through them")
    p.add_argument("--model-name", default="DiT", help="the diffusion model's name in the printed table (default DiT)")
    p.add_argument("--image-size", type=int, default=64, help="image side of the samples (default 64)")
    p.add_argument("--feature-extractor", default="usp-synthetic", help="extractor (default usp-synthetic)")
    p.add_argument("--metrics", nargs="+", default=["fid", "is", "kid", "pr"], help="metrics (default fid is kid pr)")
    p.add_argument("--seed", type=int, default=0, help="seed of the baselines' images")
    p.add_argument("--out", default=None, help="summary file (default RUN/summary.json)")
    p.add_argument("--commit", default="unknown", help="the code's commit, recorded in the summary")
    p.add_argument("--wall-seconds", type=float, default=None, help="the job's wall time, recorded in the summary")
    p.add_argument("--stages-run", nargs="*", default=[], help="the stages this invocation ran (the others were "
                   "reused), recorded in the summary")
    p.add_argument("--benchmark", default="benchmarks/effect/run.py",
                   help="the benchmark that compares USP with its baselines over seeds (named when USP loses here); "
                   "its report, once run, lands in benchmarks/reports/")
    return p


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def baselines(data: str, n: int, size: int, vae_path: str, seed: int, vae_version: str = "d8",
              latent_stats: str = ""):
    """{name: uint8 (n, size, size, 3)} for the reference sets."""
    import numpy as np
    import torch

    from usp_scale.data.synthetic import load_split
    from usp_scale.vae import FrozenVAE

    rng = np.random.default_rng(seed)
    xtr, _ = load_split(data, "train")
    real = xtr[np.sort(rng.choice(len(xtr), size=min(n, len(xtr)), replace=False))]
    noise = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    vae = FrozenVAE(path=vae_path, version=vae_version, latent_stats=latent_stats)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n,) + vae.latent_shape(size), generator=g)
    dec = ((vae.decode(z) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return {"real": real, "noise": noise, "vae_random_latents": dec}


def _stage_settings(folder: str) -> dict:
    """{stage: {key: value}} from the main job's OUT/stages/<stage>.done files (lines key=value)."""
    out = {}
    if os.path.isdir(folder):
        for f in sorted(os.listdir(folder)):
            if f.endswith(".done"):
                with open(os.path.join(folder, f)) as fh:
                    out[f[:-5]] = dict(line.rstrip("\n").split("=", 1) for line in fh if "=" in line)
    return out


def _probe_top1(path: str):
    probe = [r for r in _jsonl(path) if r.get("kind") == "eval"] if os.path.isfile(path) else []
    return probe[-1]["top1"] if probe else None


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from usp_scale.eval import compute_metrics

    run = a.run
    val = os.path.join(a.data, "val")
    keys = ("fid", "is_mean", "kid_mean", "precision", "recall")
    table, n = {}, None
    for name, folder in (("samples", "samples"), ("samples_scratch", "samples_scratch")):
        path = os.path.join(run, folder, "metrics.jsonl")
        if not os.path.isfile(path):
            if name == "samples":
                raise FileNotFoundError(f"{path} is missing: the USP samples were not scored")
            continue
        rec = _jsonl(path)
        table[name] = {k: v for k, v in {r["metric"]: r["value"] for r in rec}.items() if k in keys}
        n = n or int(rec[-1]["num_samples"])
    for name, images in baselines(a.data, n, a.image_size, a.vae, a.seed, a.vae_version,
                                     a.latent_stats).items():
        r = compute_metrics(images, val, a.metrics, a.feature_extractor, progress=False)
        table[name] = {k: r[k] for k in keys if k in r}
    summary = {"feature_extractor": a.feature_extractor, "num_images": n, "reference": val, "metrics": table,
               "linprobe_top1": _probe_top1(os.path.join(run, "linprobe", "metrics.jsonl")),
               "linprobe_random_init_top1": _probe_top1(os.path.join(run, "linprobe_random", "metrics.jsonl")),
               "linprobe_chance": 100.0 / len(os.listdir(val))}
    for stage in ("pretrain", "dit", "dit_scratch"):
        path = os.path.join(run, stage, "metrics.jsonl")
        if os.path.isfile(path):
            losses = [r["loss"] for r in _jsonl(path) if r.get("kind") == "train"]
            summary[f"{stage}_loss_first_last"] = [losses[0], losses[-1]]
    m = a.model_name
    names = {"samples": f"USP {m} samples", "samples_scratch": f"{m} from scratch", "real": "real train images",
             "vae_random_latents": "VAE(random latents)", "noise": "uniform noise"}
    print(f"\nFID / IS / KID / precision / recall vs the val split ({n} images each, extractor "
          f"{a.feature_extractor}: these numbers hold for this synthetic dataset only)")
    print(f"{'images':22s} {'FID':>8s} {'IS':>6s} {'KID':>8s} {'prec':>6s} {'recall':>6s}")
    for name, r in table.items():
        print(f"{names.get(name, name):22s} {r.get('fid', float('nan')):8.3f} {r.get('is_mean', float('nan')):6.2f} "
              f"{r.get('kid_mean', float('nan')):8.4f} {r.get('precision', float('nan')):6.2f} "
              f"{r.get('recall', float('nan')):6.2f}")
    p_usp, p_rnd = summary["linprobe_top1"], summary["linprobe_random_init_top1"]
    fmt = lambda v: "n/a" if v is None else f"{v:.1f} %"
    if p_usp is not None or p_rnd is not None:
        print(f"linear probe top-1 on val: pretrained encoder {fmt(p_usp)}, the same encoder randomly initialised "
              f"{fmt(p_rnd)} (chance {summary['linprobe_chance']:.0f} %)")
    verdict = {}
    if "samples_scratch" in table:
        fu, fs = table["samples"]["fid"], table["samples_scratch"]["fid"]
        verdict["dit"] = "USP better" if fu < fs else "USP not better"
        print(f"{m}: USP FID {fu:.2f} vs from scratch {fs:.2f} at the same steps: "
              + (f"USP lower by {fs - fu:.2f} on this one seed." if fu < fs
                 else "USP does not beat training from scratch here."))
    if p_usp is not None and p_rnd is not None:
        verdict["linprobe"] = "USP better" if p_usp > p_rnd else "USP not better"
        print(f"Linear probe: pretrained {p_usp:.1f} % vs random init {p_rnd:.1f} %: "
              + (f"USP higher by {p_usp - p_rnd:.1f} points on this one seed." if p_usp > p_rnd
                 else "USP does not beat a random encoder here."))
    if verdict:   # one seed either way: a difference here is not evidence (the seed spread is not measured here)
        print(f"One seed, a tiny model and a short pretraining: a difference of a few FID or probe points is within "
              f"the spread between seeds. {a.benchmark} compares USP with these baselines over seeds, with spreads.")
    summary["verdict"] = verdict
    summary["settings"] = _stage_settings(os.path.join(run, "stages"))
    summary["commit"] = a.commit
    summary["wall_seconds"] = a.wall_seconds
    summary["stages_run"] = [s for s in a.stages_run if s]
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
