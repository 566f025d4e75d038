#!/usr/bin/env python
"""What the fast variants cost in quality, on the small synthetic set, at equal steps and seeds.

    python benchmarks/data/input_quality.py --out OUT [--seeds 0,1] [--only online,cache_k1_mean,...]

Pretraining inputs (each run: vit_tiny_patch_vae, the same steps, blr, seed; fp32 so that only the inputs differ):
  * ``online``            the paper's recipe: a fresh RandomResizedCrop + flip of every image every epoch, encoded
                          online, posterior mean;
  * ``cache_k{K}_{mean,sample}``  a latent cache of K crop views (each stored plain and flipped) written once, one
                          random (view, flip) per image and epoch, posterior mean or a posterior sample per epoch.
Precision (online inputs): ``prec_fp16`` (the official fp16 autocast + GradScaler), ``prec_bf16`` (bf16 autocast;
the fp32 baseline is ``online``). DiT precision: ``dit_bf16`` finetunes the ``online`` encoder with bf16 autocast
against the official fp32 of every other row.
Each pretrained encoder is measured by: its masked-latent loss on held-out inputs (val images, eval crop, and fresh
crops of the train images never drawn in training; posterior mean, fixed masks), a linear probe (top-1 on val),
and DiT-tiny/2-VAE-simple finetuned from it (the same inputs for every row: a cached ADM crop, a posterior sample
per epoch): the held-out DDPM loss of its EMA weights on val latents (fixed t and noise) and, with ``--extractor``,
FID of ``--fid-samples`` EMA samples (DDPM 50 steps, no guidance) against the train images. Defaults: the shipped
trained VAE ``synthetic-f8`` and extractor ``usp-synthetic`` on the dataset they were trained on (the main job's:
10 classes x 100 train + 8 val images at 64 px); ``--vae tiny-random --extractor ''`` gives the random-VAE run.
Results accumulate in OUT/results.jsonl (a rerun skips finished rows); OUT/summary.md has the table (mean and
spread over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

INPUTS = ["online"] + [f"cache_k{k}_{p}" for k in (1, 2, 8) for p in ("mean", "sample")]
PRECISION = ["prec_fp16", "prec_bf16", "dit_bf16"]


def _cfg(path: str, overrides: list):
    from usp_scale.config import load_config
    return load_config(os.path.join(REPO, "configs", "debug", path), overrides)


def _quiet() -> list:
    return ["progress=false", "plot=false", "tensorboard=false", "log_every=1000", "checkpoint.every_steps=0",
            "checkpoint.export_official=false", "data.num_workers=0"]


def make_cache(a, data: str, k: int, augment: str = "pretrain") -> str:
    from usp_scale.data.datasets import build_dataset
    from usp_scale.data.cache_writer import write_cache, write_manifest
    from usp_scale.vae import FrozenVAE
    out = os.path.join(a.out, "caches", f"{augment}_k{k}")
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        write_cache(build_dataset(data, "train", "folder"), FrozenVAE(path=a.vae), out, image_size=64, views=k,
                    augment=augment, shard_size=1000, batch_size=64, progress=False)
        write_manifest(out)
    return out


def pretrain(a, data: str, name: str, seed: int) -> str:
    out = os.path.join(a.out, "runs", f"{name}_s{seed}", "pretrain")
    ov = [f"output_dir={out}", f"data.root={data}", f"seed={seed}", f"schedule.epochs={a.epochs}",
          f"optim.blr={a.blr}", "schedule.warmup_epochs=2", f"vae.path={a.vae}", "engine.precision=fp32", *_quiet()]
    if name.startswith("cache"):
        k, post = name.split("_")[1][1:], name.split("_")[2]
        ov += ["data.format=latents", f"data.latent_cache={make_cache(a, data, int(k))}",
               f"data.latent_sample={'true' if post == 'sample' else 'false'}"]
    if name.startswith("prec_"):
        ov.append(f"engine.precision={name.split('_')[1]}")
    from usp_scale.training import run
    if not os.path.isfile(os.path.join(out, "export", "model.safetensors")):
        run(_cfg("tiny.yaml", ov))
    return os.path.join(out, "export", "model.safetensors")


def held_out_latents(a, data: str):
    """{"val": eval crops of the val split, "fresh": crops of the train split at an epoch never trained} -> (N,4,8,8)
    posterior-mean latents (the tiny VAE), labels."""
    from usp_scale.config import DataConfig
    from usp_scale.data import build_image_loader
    from usp_scale.vae import FrozenVAE
    vae = FrozenVAE(path=a.vae)
    out = {}
    for key, train in (("val", False), ("fresh", True)):
        ld = build_image_loader(DataConfig(root=data, image_size=64, batch_size=50, num_workers=0, loader="torchvision",
                                           augment="pretrain"), train=train, seed=12345)
        ld.set_epoch(10 ** 6)
        zs, ys = [], []
        for b in ld:
            zs.append(vae.encode(b["images"], posterior="mean"))
            ys.append(b["labels"])
        out[key] = (torch.cat(zs), torch.cat(ys))
    return out


@torch.no_grad()
def mae_loss(path: str, x: torch.Tensor) -> float:
    from usp_scale.models import create_model
    from usp_scale.transfer.formats import load_weights
    m = create_model("vit_tiny_patch_vae", img_size=8, in_chans=4, norm_pix_loss=True)
    load_weights(m, path)
    m.eval()
    g = torch.Generator().manual_seed(0)
    losses = []
    for r in range(4):  # four fixed masks per input
        noise = torch.rand(x.shape[0], 16, generator=g)
        losses.append(float(m(x, mask_ratio=0.75, noise=noise)[0]))
    return sum(losses) / len(losses)


def linprobe(a, data: str, name: str, seed: int, init: str) -> float:
    out = os.path.join(a.out, "runs", f"{name}_s{seed}", "linprobe")
    from usp_scale.training import run
    res = run(_cfg("tiny_linprobe.yaml", [f"output_dir={out}", f"data.root={data}", f"seed={seed}",
                                          f"checkpoint.init_from={init}", f"vae.path={a.vae}",
                                          "checkpoint.export=false", "eval_every_epochs=0", *_quiet()]))
    return float(res["eval"]["top1"])


def dit(a, data: str, name: str, seed: int, init: str, precision: str) -> dict:
    out = os.path.join(a.out, "runs", f"{name}_s{seed}", "dit")
    from usp_scale.training import run
    ov = [f"output_dir={out}", f"data.root={data}", f"seed={seed}", f"checkpoint.init_from={init}",
          f"vae.path={a.vae}", f"schedule.max_steps={a.dit_steps}", f"engine.precision={precision}",
          "data.format=latents", f"data.latent_cache={make_cache(a, data, 1, 'adm')}", "data.latent_sample=true",
          *_quiet()]
    if a.extractor:
        ov += [f"eval.fid_every={a.dit_steps}", f"eval.fid_samples={a.fid_samples}", f"eval.fid_reference={data}/train",
               f"eval.feature_extractor={a.extractor}", "eval.steps=50", "eval.cfg_scale=1.0"]
    run(_cfg("tiny_dit.yaml", ov))
    res = {"dit_ema": os.path.join(out, "export", "ema.safetensors")}
    if a.extractor:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            fids = [json.loads(x)["fid"] for x in f if '"metric": "fid"' in x]
        res["fid"] = fids[-1]
    return res


@torch.no_grad()
def dit_loss(path: str, x: torch.Tensor, y: torch.Tensor) -> float:
    from usp_scale.diffusion import create_diffusion
    from usp_scale.models import create_model
    from usp_scale.transfer.formats import load_weights
    m = create_model("DiT-tiny/2-VAE-simple", input_size=8, num_classes=10, learn_sigma=True)
    load_weights(m, path)
    m.eval()
    diffusion = create_diffusion(learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    tot = []
    for _ in range(8):   # 8 fixed (t, noise) draws per latent
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=g)
        noise = torch.randn(x.shape, generator=g)
        tot.append(float(diffusion.training_losses(m, x, t, dict(y=y), noise=noise)["loss"].mean()))
    return sum(tot) / len(tot)


def summarise(a) -> str:
    rows = [json.loads(x) for x in open(os.path.join(a.out, "results.jsonl"))]
    keys = ["mae_loss_val", "mae_loss_fresh", "linprobe_top1", "dit_loss_val"] + (["fid"] if a.extractor else [])
    lines = ["| variant | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name in INPUTS + PRECISION:
        rs = [r for r in rows if r["variant"] == name]
        if not rs:
            continue
        cells = []
        for k in keys:
            v = [r[k] for r in rs if k in r]
            cells.append(f"{statistics.mean(v):.4f} ± {statistics.pstdev(v):.4f}" if len(v) > 1 else
                         (f"{v[0]:.4f}" if v else "-"))
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (dataset, caches, runs, results.jsonl, summary.md)")
    ap.add_argument("--seeds", default="0,1", help="comma list of seeds (default 0,1)")
    ap.add_argument("--only", default="", help=f"comma list of variants (default all: {', '.join(INPUTS + PRECISION)})")
    ap.add_argument("--epochs", type=int, default=12, help="pretraining epochs (31 steps of 32 each; default 12)")
    ap.add_argument("--blr", type=float, default=1.5e-3, help="pretraining base lr (default 1.5e-3)")
    ap.add_argument("--dit-steps", type=int, default=600, help="DiT finetuning steps (default 600)")
    ap.add_argument("--vae", default="synthetic-f8", help="VAE path or name (default synthetic-f8, the shipped one)")
    ap.add_argument("--extractor", default="usp-synthetic", help="feature extractor for FID ('' = no FID)")
    ap.add_argument("--fid-samples", type=int, default=500, help="samples per FID (default 500)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings
    warnings.filterwarnings("ignore")
    os.makedirs(a.out, exist_ok=True)
    data = os.path.join(a.out, "data")
    if not os.path.isfile(os.path.join(data, "synthetic.json")):
        from usp_scale.data.synthetic import make_synthetic
        make_synthetic(data, classes=10, per_class=100, val_per_class=8, size=64)   # the main job's set
    variants = [v for v in (a.only.split(",") if a.only else INPUTS + PRECISION) if v]
    bad = [v for v in variants if v not in INPUTS + PRECISION]
    if bad:
        raise SystemExit(f"--only: unknown variants {bad}; use {', '.join(INPUTS + PRECISION)}")
    res_path = os.path.join(a.out, "results.jsonl")
    done = set()
    if os.path.isfile(res_path):
        done = {(r["variant"], r["seed"]) for r in map(json.loads, open(res_path))}
    held = held_out_latents(a, data)
    for seed in [int(s) for s in a.seeds.split(",")]:
        for name in variants:
            if (name, seed) in done:
                continue
            t0 = time.time()
            row = {"variant": name, "seed": seed}
            if name == "dit_bf16":  # the online encoder (its own row), finetuned in bf16
                mae = pretrain(a, data, "online", seed)
            else:
                mae = pretrain(a, data, name, seed)
                row.update(mae_loss_val=mae_loss(mae, held["val"][0]), mae_loss_fresh=mae_loss(mae, held["fresh"][0]),
                           linprobe_top1=linprobe(a, data, name, seed, mae))
            d = dit(a, data, name, seed, mae, "bf16" if name == "dit_bf16" else "fp32")
            row["dit_loss_val"] = dit_loss(d.pop("dit_ema"), *held["val"])
            row.update(d)
            row["seconds"] = round(time.time() - t0, 1)
            print(json.dumps(row), flush=True)
            with open(res_path, "a") as f:
                f.write(json.dumps(row) + "\n")
    summary = summarise(a)
    print(summary)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
