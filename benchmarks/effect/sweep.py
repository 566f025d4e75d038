#!/usr/bin/env python
"""Where the USP effect starts: ``benchmarks/effect/run.py`` around its default setting, one axis at a time.

Axes (each point is a full run.py run: one MAE pretraining, then the comparisons with every seed):

* ``epochs``: MAE pretraining epochs over the pool (default points 5 15 40 100);
* ``pool``: pool images per class at a fixed number of pretraining steps (the default setting's: 40 epochs of
  1,000 per class), so only the number of distinct images changes (default points 100 300 1000);
* ``size``: model width/depth, MAE, encoder and DiT/SiT together: ``tiny`` (128 wide, 2 deep) and ``mini`` (192, 4).

Each point reports the USP gain over its baseline per comparison (mean ± std over the seeds) and what it cost
(wall seconds of its jobs, pretraining separately). The comparisons default to the cheap ones (linear probe,
k-NN, label-scarce finetuning); ``--with-gen`` adds the DiT/SiT runs to every point (the expensive part: about
an hour per point for tiny on 2 cores). Points that share a pool share its dataset and latent caches.

    python benchmarks/effect/sweep.py --out runs/effect_sweep --report benchmarks/reports

The report ends with the projected GPU run that would reproduce the paper's Figure 3 at B size (the command of
benchmarks/convergence/run.py and its GPU-hours from benchmarks/cost_report.py --size B).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

BASE = {"epochs": 40, "pool": 1000, "size": "tiny"}
NAMES = {"linprobe": "linear probe vs random init", "cls": "label-scarce finetuning vs scratch",
         "knn": "10-NN vs random init", "dit_fid": "DiT final FID vs scratch", "sit_fid": "SiT final FID vs scratch"}
WARMUP_FRACTION = 0.05   # MAE warmup epochs per pretraining epoch (run.py's default: 2 of 40)
# measured on one H200 (benchmarks/reports/train_step_h200_2026-11-26.md, torch.compile, bf16): samples/s
XL_RATES = {"MAE-XL": 2061.0, "DiT-XL/2": 552.0}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder (one sub-folder per point, shared data per pool)")
    p.add_argument("--report", default="", help="also write the report (markdown + PNG + JSON) into this folder, "
                   "named effect_sweep_<device>_<date>")
    p.add_argument("--axes", nargs="+", default=["epochs", "pool", "size"], choices=["epochs", "pool", "size"],
                   help="axes to sweep (default all three)")
    p.add_argument("--epochs", nargs="+", type=int, default=[5, 15, 40, 100], help="points of the epochs axis")
    p.add_argument("--pool", nargs="+", type=int, default=[100, 300, 1000], help="points of the pool axis "
                   "(images per class; pretraining steps held at the default setting's)")
    p.add_argument("--size", nargs="+", default=["tiny", "mini"], choices=["tiny", "mini"],
                   help="points of the size axis")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of every point (default 0 1 2)")
    p.add_argument("--with-gen", action="store_true", help="also run the DiT/SiT comparison at every point")
    p.add_argument("--jobs", type=int, default=2, help="jobs at a time inside each point (default 2)")
    p.add_argument("--run-set", default="", metavar="'ARGS'",
                   help="more arguments for every run.py call, as one quoted string (e.g. --run-set='--gen-steps 2000'"
                   "); they come last, so they override the sweep's own")
    p.add_argument("--only-report", action="store_true", help="rebuild the report from OUT/sweep.json")
    p.add_argument("--base-out", default="", help="the OUT of an earlier benchmarks/effect/run.py run with the default "
                   "setting: the sweep's default point reuses its runs and the 1,000-per-class points its data and "
                   "caches (whatever finished with the same settings)")
    return p


def points(a) -> list:
    """(axis, value, run.py arguments) of every point; the default setting appears once per axis."""
    out = []
    for axis in a.axes:
        for v in getattr(a, axis):
            s = dict(BASE, **{axis: v})
            if axis == "pool":   # the pretraining steps of the default setting, spread over fewer images
                s["epochs"] = round(BASE["epochs"] * BASE["pool"] / v)
            out.append((axis, v, s))
    return out


def run_args(a, s: dict) -> list:
    name = f"e{s['epochs']}_p{s['pool']}_{s['size']}"
    out = a.base_out if a.base_out and s == BASE else os.path.join(a.out, name)
    data = a.base_out if a.base_out and s["pool"] == BASE["pool"] else os.path.join(a.out, f"data_p{s['pool']}")
    args = ["--out", out, "--data-dir", data, "--results", os.path.join(a.out, name + ".json"),
            "--pool-per-class", str(s["pool"]), "--mae-epochs", str(s["epochs"]),
            "--mae-model", f"vit_{s['size']}_patch_vae", "--dit-model", f"DiT-{s['size']}/2-VAE-simple",
            "--sit-model", f"SiT-{s['size']}/2-VAE-simple", "--jobs", str(a.jobs),
            "--seeds", *[str(k) for k in a.seeds]]
    # run.py's MAE overrides with the warmup scaled to the point (5 % of the epochs, as the default setting's 2 of 40):
    # the same warmup steps on the pool axis, and a valid schedule at 1 epoch
    from run import build_parser as run_parser

    mae_set = [kv for kv in run_parser().get_default("mae_set") if not kv.startswith("schedule.warmup_epochs=")]
    args += ["--mae-set", *mae_set, f"schedule.warmup_epochs={WARMUP_FRACTION * s['epochs']:g}"]
    if not a.with_gen:
        args += ["--only", "repr", "finetune"]
    return args + shlex.split(a.run_set)


def gains(res: dict) -> dict:
    """{comparison: (mean, std, per-seed list)} of USP minus its baseline (FID: baseline minus USP)."""
    from run import stats

    out = {}
    for key, c in res["comparisons"].items():
        s = stats(c["usp"], c["baseline"], c["higher_is_better"])
        out[key] = {"mean": s["gain_mean"], "std": s["gain_std"], "usp": s["usp_mean"], "base": s["base_mean"],
                    "wins": s["wins"], "n": s["n"]}
    for fam, sm in res.get("convergence", {}).get("summary", {}).items():
        fu = [c[-1] for c in sm["curves"]["usp"]["per_seed"]]
        fs = [c[-1] for c in sm["curves"]["scratch"]["per_seed"]]
        s = stats(fu, fs, higher_is_better=False)
        out[f"{fam}_fid"] = {"mean": s["gain_mean"], "std": s["gain_std"], "usp": s["usp_mean"],
                             "base": s["base_mean"], "wins": s["wins"], "n": s["n"], "speedup": sm["speedup"]}
    return out


def projection() -> dict:
    """GPU-hours of the paper's Figure 3 at B size (MAE-B 800 epochs, DiT-B/2 and SiT-B/2 from USP and from scratch,
    400K steps each at batch 256) from cost_report.py, at rates scaled from the measured XL ones by FLOPs."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import cost_report

    from usp_scale.models import create_model

    fl = {}
    for key, name, kw in (("MAE-XL", "vit_xlarge_patch_vae", dict(img_size=28)),
                          ("MAE-B", "vit_base_patch_vae", dict(img_size=28)),
                          ("DiT-XL/2", "DiT-XL/2-VAE-simple", dict(input_size=32)),
                          ("DiT-B/2", "DiT-B/2-VAE-simple", dict(input_size=32))):
        m = create_model(name, device="meta", **kw)
        fl[key] = float(m.flops_per_sample(mask_ratio=0.75) if key.startswith("MAE") else m.flops_per_sample())
    rates = {"MAE-B": XL_RATES["MAE-XL"] * fl["MAE-XL"] / fl["MAE-B"],
             "DiT-B/2": XL_RATES["DiT-XL/2"] * fl["DiT-XL/2"] / fl["DiT-B/2"]}
    r = cost_report.report(cost_report.given_rows(rates, "NVIDIA H200"), card="NVIDIA H200", pretrain_epochs=800,
                           finetune_steps=400_000, scratch_steps=400_000, batch=256, size="B")
    hours = {it["key"]: it["hours"] for it in r["items"]}
    # Figure 3 needs DiT and SiT (same step cost) from both initialisations, FID-10K every 50K steps (not costed)
    total = hours["usp_pretrain"] + 2 * (hours["usp_finetune"] + hours["scratch_dit"])
    cmd_cost = ("python benchmarks/cost_report.py --size B --rate MAE-B={:.0f} --rate DiT-B/2={:.0f} --card H200 "
                "--pretrain-epochs 800 --scratch-steps 400000").format(rates["MAE-B"], rates["DiT-B/2"])
    return {"flops": fl, "rates": rates, "hours": hours, "total_h200_hours": total,
            "total_h100_equiv_hours": total,   # equal dense bf16 peak (cost_report.PEAK_TFLOPS)
            "cost_command": cmd_cost,
            "run_command": "torchrun --nproc_per_node 8 benchmarks/convergence/run.py --out runs/fig3_b --data "
                           "/data/imagenet --image-size 256 --vae /weights/sd-vae-ft-ema --mae-model "
                           "vit_base_patch_vae --mae-epochs 800 --dit-model DiT-B/2-VAE-simple --sit-model "
                           "SiT-B/2-VAE-simple --classes 1000 --steps 400000 --eval-every 50000 --fid-samples 10000 "
                           "--fid-reference VIRTUAL_imagenet256_labeled.npz --feature-extractor inception-v3-compat "
                           "--seeds 0 --set optim.lr=1.0e-4 ema.decay=0.9999 engine.name=ddp data.batch_size=32 "
                           "eval.inception_weights=/weights/incep.pth --mae-set optim.blr=1.5e-4 "
                           "schedule.warmup_epochs=40 data.batch_size=512 engine.name=ddp engine.precision=bf16 "
                           "--cache-pre /cache/in256_pre --cache-dit /cache/in256_adm"}


def plot(doc: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_used = list(dict.fromkeys(p["axis"] for p in doc["points"]))
    fig, axs = plt.subplots(1, len(axes_used), figsize=(4.6 * len(axes_used), 3.8), squeeze=False)
    label = {"epochs": "MAE pretraining epochs", "pool": "pool images per class (same pretraining steps)",
             "size": "model size"}
    for ax, axis in zip(axs[0], axes_used):
        pts = [p for p in doc["points"] if p["axis"] == axis]
        xs = list(range(len(pts)))
        keys = sorted({k for p in pts for k in p["gains"]})
        for j, k in enumerate(keys):
            m = [p["gains"].get(k, {}).get("mean", float("nan")) for p in pts]
            sd = [p["gains"].get(k, {}).get("std", 0.0) for p in pts]
            ax.errorbar([x + 0.06 * (j - len(keys) / 2) for x in xs], m, yerr=sd, marker="o", capsize=3,
                        label=NAMES.get(k, k) + (" (FID saved)" if k.endswith("_fid") else " (points of top-1)"))
        ax.axhline(0, color="k", lw=0.7)
        ax.set_xticks(xs, [f"{p['value']}\n{p['seconds'] / 60:.0f} min" for p in pts])
        ax.set_xlabel(label[axis] + "\n(wall minutes of the point's jobs)", fontsize=8)
        ax.set_ylabel("USP minus baseline")
        ax.legend(fontsize=7)
    fig.suptitle(f"USP gain over its baseline, mean ± std over seeds {doc['seeds']} ({doc['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(doc: dict, png: str) -> str:
    distinct = {json.dumps(p["setting"], sort_keys=True): p["seconds"] for p in doc["points"]}
    L = [f"# Where the USP effect starts: the effect benchmark swept on a CPU ({doc['date']})", "",
         f"Machine: {doc['machine']}; {doc['wall_minutes']:.0f} min wall for this invocation, "
         f"{sum(distinct.values()) / 60:.0f} min of job wall time over its {len(distinct)} distinct points (a point "
         "finished by an earlier invocation is reused and counts its own jobs' time); load average at the start "
         f"{doc['load_start']}, at the end {doc['load_end']} (other users' jobs included).", "",
         f"Command: `{doc['command']}`", "",
         "Each point is one `benchmarks/effect/run.py` run (its own MAE pretraining, then every comparison with seeds "
         f"{doc['seeds']}); one axis varies at a time around the default setting (tiny, 40 epochs, 1,000 pool "
         "images per class). Gains are USP minus its baseline per seed (top-1 points; for FID, scratch minus USP), "
         "mean ± std; `wins` counts the seeds where USP is ahead.", "",
         f"![gains against scale]({os.path.basename(png)})",
         "", "| axis | point | comparison | USP | baseline | gain (mean ± std) | wins | point's wall min (MAE) |",
         "|---|---|---|---|---|---|---|---|"]
    for p in doc["points"]:
        for k, g in p["gains"].items():
            L.append(f"| {p['axis']} | {p['value']} | {NAMES.get(k, k)} | {g['usp']:.2f} | {g['base']:.2f} | "
                     f"{g['mean']:+.2f} ± {g['std']:.2f} | {g['wins']}/{g['n']} | {p['seconds'] / 60:.1f} ({p['mae_seconds'] / 60:.1f}) |")
    if not doc.get("complete", True):
        L[1:1] = ["", f"**Partial**: the sweep stopped after {len(doc['points'])} point(s); rerun its command to go on "
                  "(finished jobs are reused)."]
    pr = doc.get("projection") or projection()
    h = pr["hours"]
    L += ["", "## The projected GPU run: the paper's Figure 3 at B size", "",
          "MAE-B pretrained 800 epochs on ImageNet (cached latents, batch 4096), then DiT-B/2 and SiT-B/2 from it and "
          "from scratch, 400K steps each at batch 256, FID every 50K steps (1 seed; the paper's XL figure shows one "
          "run per curve):", "", "    " + pr["run_command"], "",
          f"Cost (`{pr['cost_command']}`): MAE-B 800 epochs {h['usp_pretrain']:.1f} H200-hours, each 400K-step "
          f"B/2 run {h['usp_finetune']:.1f} H200-hours; the figure's four runs plus the pretraining "
          f"**{pr['total_h200_hours']:.0f} H200-hours** (about {pr['total_h200_hours'] / 8:.0f} h on 8 GPUs), FID "
          "evaluations not included. The rates are not measured at B size: they are the measured XL rates (MAE-XL "
          f"{XL_RATES['MAE-XL']:.0f}, DiT-XL/2 {XL_RATES['DiT-XL/2']:.0f} samples/s on an H200) scaled by the FLOP "
          f"ratio (MAE {pr['flops']['MAE-XL'] / pr['flops']['MAE-B']:.2f}x, DiT "
          f"{pr['flops']['DiT-XL/2'] / pr['flops']['DiT-B/2']:.2f}x) at the same MFU, which smaller models rarely "
          "reach: read them as a lower bound."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    import platform

    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "sweep.json")
    if a.only_report:
        with open(path) as f:
            doc = json.load(f)
    else:
        from run import _load

        from usp_scale.fileio import write_json

        t0, load0 = time.time(), _load()
        doc = {"date": time.strftime("%Y-%m-%d"), "machine": f"CPU {platform.machine()}, {os.cpu_count()} cores",
               "command": "python benchmarks/effect/sweep.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "load_start": load0, "seeds": a.seeds, "points": [], "complete": False}
        for axis, value, s in points(a):
            args = run_args(a, s)
            print(f"[sweep] {time.strftime('%H:%M:%S')} {axis}={value}: run.py {' '.join(args)}", flush=True)
            subprocess.run([sys.executable, os.path.join(HERE, "run.py"), *args], cwd=REPO, check=True)
            with open(args[args.index("--results") + 1]) as f:
                res = json.load(f)["results"]
            secs = res.get("seconds", {})
            doc["points"].append({"axis": axis, "value": value, "setting": s, "gains": gains(res),
                                  "seconds": sum(v for v in secs.values() if v), "mae_seconds": secs.get("mae") or 0.0})
            doc.update(wall_minutes=(time.time() - t0) / 60, load_end=_load())
            write_json(path, doc)   # after every point: a stopped sweep keeps what it measured (--only-report)
        doc.update(projection=projection(), complete=True)
        write_json(path, doc)
    png = plot(doc, os.path.join(a.out, "sweep.png"))
    md = markdown(doc, png)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(md)
    print(md)
    if a.report:
        base = os.path.join(a.report, f"effect_sweep_cpu_{doc['date']}")
        os.makedirs(a.report, exist_ok=True)
        shutil.copy(png, base + ".png")
        shutil.copy(path, base + ".json")
        with open(base + ".md", "w") as f:
            f.write(md.replace(f"]({os.path.basename(png)})", f"]({os.path.basename(base)}.png)"))
        print(f"report: {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
