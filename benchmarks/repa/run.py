#!/usr/bin/env python
"""REPA in miniature (issue 20, item 7): SiT trained with and without REPA's alignment loss at equal steps, several
seeds, FID against steps and the alignment loss against steps.

The runs are the convergence benchmark's (benchmarks/convergence/run.py: the same data, latent cache, recipe
configs/debug/tiny_dit.yaml, in-training FID, the same settings bookkeeping, reused here); this script adds the REPA
variant of each run and the teacher-feature cache it reads:

- **arms**: ``scratch`` (``--sit-model``, default SiT-tiny/2-VAE-simple, from scratch), ``scratch+repa`` (the same
  trunk with REPA's projector, ``--repa-model`` default SiT-tiny/2-VAE-simple-REPA, loss = SiT's + proj_coeff x the
  projection loss), and with ``--inits usp scratch``: ``usp`` and ``usp+repa`` (the transferred MAE; the projector
  fresh) -- USP + REPA, the paper's row, in miniature;
- **teacher**: the shipped ``synthetic-vit`` (usp_scale/assets/teacher/synthetic-vit: DINOv2's architecture at CPU
  size, trained supervised on the synthetic set's labels, 16 patch tokens of 64 at 64 px -- SiT-tiny/2's count on
  synthetic-f8's 8 x 8 latents); its tokens are cached once beside the latent cache (``repa.features=cache``).

CPU default (about 30 min of one thread): synthetic set (3,000 images, 64 px), VAE ``synthetic-f8``, extractor
``usp-synthetic``, SiT-tiny/2, 3 seeds, 1000 steps, FID (200 samples) every 250 steps:

    OMP_NUM_THREADS=1 python benchmarks/repa/run.py --out runs/repa_mini --report benchmarks/reports

Every flag of the convergence benchmark applies (--steps, --seeds, --set, --fid-samples, ...); the REPA flags are
below. Writes OUT/results.json, OUT/repa.png (FID and proj_loss against steps) and OUT/report.md; --report copies
them to repa_miniature_<device>_<date>.{md,json,png}.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def _load_convergence():
    """benchmarks/convergence/run.py as a module (the runs' machinery; both scripts are named run.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convergence_run",
                                                  os.path.join(REPO, "benchmarks", "convergence", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


conv = _load_convergence()

REPA_TAG = "+repa"


def build_parser():
    p = conv.build_parser()
    p.description = __doc__
    p.set_defaults(families=["sit"], inits=["scratch"], seeds=[0, 1, 2], steps=1000, eval_every=250)
    g = p.add_argument_group("REPA")
    g.add_argument("--repa-model", default="SiT-tiny/2-VAE-simple-REPA",
                   help="the REPA arm's model: --sit-model's trunk with REPA's projector "
                        "(default SiT-tiny/2-VAE-simple-REPA)")
    g.add_argument("--teacher", default="synthetic-vit", help="repa.teacher (default: the shipped synthetic-vit)")
    g.add_argument("--teacher-path", default="synthetic-vit",
                   help="repa.teacher_path (default: the shipped synthetic-vit's weights)")
    g.add_argument("--teacher-cache", default="", help="existing teacher-feature cache beside --cache-dit "
                   "(default: write OUT/teacher_cache)")
    g.add_argument("--encoder-depth", type=int, default=1, help="repa.encoder_depth (default 1: SiT-tiny has 2 "
                   "blocks; REPA reads block 8 of SiT-XL's 28)")
    g.add_argument("--projector-dim", type=int, default=256, help="repa.projector_dim (default 256; REPA's 2048 "
                   "is for 1152-wide models)")
    g.add_argument("--proj-coeff", type=float, default=0.5, help="repa.proj_coeff (default 0.5, REPA's)")
    g.add_argument("--log-every", type=int, default=50, help="steps per logged proj_loss window (default 50)")
    return p


def teacher_cache(a, paths) -> str:
    """The teacher's tokens of every crop of the ADM latent cache (rank 0 writes, settings recorded)."""
    out = a.teacher_cache or os.path.join(a.out, "teacher_cache")
    settings = {"latent_cache": conv._read_settings(paths["cache_dit"]), "teacher": a.teacher,
                "teacher_path": a.teacher_path, "image_size": a.image_size}
    if conv._rank() == 0:
        own = not a.teacher_cache
        ready = conv._settings_match(out, settings, own=own) if own else True
        if not (ready and os.path.isfile(os.path.join(out, "manifest.json"))):
            import torch

            from usp_scale.data import build_dataset
            from usp_scale.data.teacher_cache import write_teacher_cache, write_teacher_manifest
            from usp_scale.transfer.teachers import load_teacher
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            teacher = load_teacher(a.teacher_path, name=a.teacher, image_size=a.image_size, device=dev)
            write_teacher_cache(build_dataset(paths["data"], "train", "folder"), teacher, out, paths["cache_dit"],
                                batch_size=100, progress=True)
            write_teacher_manifest(out)
            conv._record_settings(out, settings)
    conv._barrier()
    return out


def repa_overrides(a, cache: str) -> list:
    return [f"model.name={a.repa_model}", "repa.enabled=true", f"repa.teacher={a.teacher}",
            f"repa.teacher_path={a.teacher_path}", "repa.features=cache", f"repa.teacher_cache={cache}",
            f"repa.encoder_depth={a.encoder_depth}", f"repa.projector_dim={a.projector_dim}",
            f"repa.proj_coeff={a.proj_coeff}"]


def arms(a):
    return [init + tag for init in a.inits for tag in ("", REPA_TAG)]


# ----------------------------------------------------------------------------------------------- analysis

def _mean_std(rows):
    import numpy as np

    x = np.array(rows, dtype=float)
    return x.mean(0).tolist(), (x.std(0, ddof=1).tolist() if len(x) > 1 else [0.0] * x.shape[1])


def summarize(results: dict) -> dict:
    """Per arm: seed-mean FID and proj_loss curves; per pair (init, init+repa): the final-FID gain per seed (paired
    by seed: the same data order and draws up to the projector)."""
    import numpy as np

    out = {"arms": {}, "pairs": {}}
    for arm, by_seed in results.items():
        seeds = sorted(by_seed, key=int)
        steps = [s for s, _ in by_seed[seeds[0]]["fid"]]
        fm, fs = _mean_std([[f for _, f in by_seed[s]["fid"]] for s in seeds])
        entry = {"steps": steps, "fid_mean": fm, "fid_std": fs,
                 "fid_per_seed": {s: [f for _, f in by_seed[s]["fid"]] for s in seeds}}
        if by_seed[seeds[0]]["proj"]:
            psteps = [s for s, _ in by_seed[seeds[0]]["proj"]]
            pm, ps = _mean_std([[v for _, v in by_seed[s]["proj"]] for s in seeds])
            entry.update(proj_steps=psteps, proj_mean=pm, proj_std=ps)
        out["arms"][arm] = entry
    for arm in results:
        if arm.endswith(REPA_TAG) and arm[:-len(REPA_TAG)] in results:
            base, rep = results[arm[:-len(REPA_TAG)]], results[arm]
            seeds = sorted(set(base) & set(rep), key=int)
            gain = np.array([base[s]["fid"][-1][1] - rep[s]["fid"][-1][1] for s in seeds])
            auc = np.array([sum(f for _, f in base[s]["fid"]) - sum(f for _, f in rep[s]["fid"]) for s in seeds])
            out["pairs"][arm] = {"base": arm[:-len(REPA_TAG)], "seeds": seeds,
                                 "final_fid_gain_per_seed": gain.tolist(), "final_fid_gain_mean": float(gain.mean()),
                                 "final_fid_gain_std": float(gain.std(ddof=1)) if len(gain) > 1 else 0.0,
                                 "repa_better_seeds": int((gain > 0).sum()),
                                 "sum_fid_gain_mean": float(auc.mean()),
                                 "sum_fid_gain_std": float(auc.std(ddof=1)) if len(auc) > 1 else 0.0}
    return out


COLORS = {"scratch": "tab:gray", "scratch+repa": "tab:blue", "usp": "tab:red", "usp+repa": "tab:purple"}


def plot(summary: dict, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10.4, 3.8))
    for arm, c in summary["arms"].items():
        n = len(c["fid_per_seed"])
        m, sd = c["fid_mean"], c["fid_std"]
        ax.plot(c["steps"], m, "o-", color=COLORS.get(arm), label=f"{arm} (mean of {n} seeds)")
        ax.fill_between(c["steps"], [x - y for x, y in zip(m, sd)], [x + y for x, y in zip(m, sd)],
                        color=COLORS.get(arm), alpha=0.2)
        if "proj_mean" in c:
            m, sd = c["proj_mean"], c["proj_std"]
            bx.plot(c["proj_steps"], m, "-", color=COLORS.get(arm), label=arm)
            bx.fill_between(c["proj_steps"], [x - y for x, y in zip(m, sd)], [x + y for x, y in zip(m, sd)],
                            color=COLORS.get(arm), alpha=0.2)
    ax.set_xlabel("training steps")
    ax.set_ylabel("FID (usp-synthetic)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("FID against steps")
    bx.set_xlabel("training steps")
    bx.set_ylabel("proj_loss = -mean cos")
    bx.set_title("alignment loss (REPA arms)")
    bx.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(summary: dict, meta: dict, png: str) -> str:
    arms_ = list(summary["arms"])
    lines = [f"# REPA in miniature: SiT with and without REPA's alignment loss ({meta['date']})", "",
             f"Machine: {meta['machine']}, torch threads {meta['torch_threads']}; torch {meta['versions']['torch']}; "
             f"{meta['wall_minutes']:.1f} min wall; load average at the start {meta['load_start']}, at the end "
             f"{meta['load_end']} (a 2-core machine shared with other jobs).", "",
             f"Command: `{meta['command']}`", "",
             f"Data: {meta['data']}; VAE `{meta['vae']}`; FID with `{meta['feature_extractor']}`, "
             f"{meta['fid_samples']} samples vs {meta['fid_reference']}, sampler {meta['sampler']}; seeds "
             f"{meta['seeds']}; {meta['steps']} steps each. Without REPA `{meta['sit_model']}`; with REPA "
             f"`{meta['repa_model']}` (the same trunk + REPA's projector, width {meta['projector_dim']}, on block "
             f"{meta['encoder_depth']}), `proj_coeff` {meta['proj_coeff']}, teacher `{meta['teacher']}` "
             f"(`{meta['teacher_path']}`, tokens cached beside the latent cache).", "",
             f"![FID and alignment loss against steps]({os.path.basename(png)})", "",
             "## FID against steps (mean ± std over seeds)", "",
             "| step | " + " | ".join(arms_) + " |", "|---|" + "---|" * len(arms_)]
    c0 = summary["arms"][arms_[0]]
    for i, st in enumerate(c0["steps"]):
        lines.append(f"| {st} | " + " | ".join(f"{summary['arms'][a]['fid_mean'][i]:.2f} ± "
                                                f"{summary['arms'][a]['fid_std'][i]:.2f}" for a in arms_) + " |")
    lines += ["", "## Alignment loss (proj_loss, window means, mean ± std over seeds)", ""]
    for arm, c in summary["arms"].items():
        if "proj_mean" not in c:
            continue
        k = len(c["proj_steps"])
        pick = sorted({0, 1, k // 4, k // 2, 3 * k // 4, k - 1})
        lines.append(f"- {arm}: " + ", ".join(f"step {c['proj_steps'][i]}: {c['proj_mean'][i]:.3f} ± "
                                               f"{c['proj_std'][i]:.3f}" for i in pick))
    lines += ["", "## With vs without REPA (paired by seed)", ""]
    for arm, p in summary["pairs"].items():
        per = ", ".join(f"{g:+.2f}" for g in p["final_fid_gain_per_seed"])
        lines.append(f"- {p['base']} → {arm}: final FID gain (without minus with) "
                     f"**{p['final_fid_gain_mean']:+.2f} ± "
                     f"{p['final_fid_gain_std']:.2f}** (per seed {per}; REPA better in {p['repa_better_seeds']} of "
                     f"{len(p['seeds'])}); summed over the evaluations {p['sum_fid_gain_mean']:+.2f} ± "
                     f"{p['sum_fid_gain_std']:.2f}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    res_path = os.path.join(a.out, "results.json")
    if a.only_report:
        with open(res_path) as f:
            doc = json.load(f)
    else:
        import torch

        t0, load0, paths = conv.start(a)
        cache = teacher_cache(a, paths)
        results = {}
        for arm in arms(a):
            init, repa = arm.replace(REPA_TAG, ""), arm.endswith(REPA_TAG)
            for seed in a.seeds:
                extra = [f"log_every={a.log_every}"] + (repa_overrides(a, cache) if repa else [])
                fid, recs = conv.finetune(a, paths, "sit", init, seed, tag=REPA_TAG if repa else "", extra=extra,
                                          records=True)
                proj = [(r["step"], r["proj_loss"]) for r in recs if "proj_loss" in r]
                results.setdefault(arm, {})[str(seed)] = {"fid": fid, "proj": proj}
        meta = {"date": time.strftime("%Y-%m-%d"),
                "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else
                f"CPU {platform.machine()}, {os.cpu_count()} cores", "torch_threads": torch.get_num_threads(),
                "versions": {"torch": torch.__version__, "python": platform.python_version()},
                "command": "python benchmarks/repa/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "wall_minutes": (time.time() - t0) / 60, "load_start": load0, "load_end": conv._load(),
                "data": a.data or f"synthetic, {a.classes} classes x {a.per_class} train images, {a.image_size} px",
                "vae": a.vae, "feature_extractor": a.feature_extractor, "fid_samples": a.fid_samples,
                "fid_reference": a.fid_reference or "the val split", "sampler": a.sit_sampler, "seeds": a.seeds,
                "steps": a.steps, "sit_model": a.sit_model, "repa_model": a.repa_model, "teacher": a.teacher,
                "teacher_path": a.teacher_path, "encoder_depth": a.encoder_depth, "projector_dim": a.projector_dim,
                "proj_coeff": a.proj_coeff}
        doc = {"meta": meta, "results": results}
        if conv._rank() == 0:
            with open(res_path, "w") as f:
                json.dump(doc, f, indent=1)
    if conv._rank() != 0:
        return 0
    summary = summarize(doc["results"])
    doc["summary"] = summary
    m = doc["meta"]
    png = plot(summary, os.path.join(a.out, "repa.png"),
               f"{m['sit_model']} with / without REPA ({m['teacher']}) on {m['data']}; {m['machine']}, {m['date']}")
    md = markdown(summary, m, png)
    conv.finish_report(a, doc, res_path, png, md, "repa_miniature")
    return 0


if __name__ == "__main__":
    sys.exit(main())
