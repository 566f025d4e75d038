#!/usr/bin/env python
"""The paper's central claim in miniature: DiT / SiT finetuned from the USP-pretrained MAE vs from scratch.

Figure 3 of the paper: DiT-XL/2 and SiT-XL/2 initialised from the USP encoder reach the FID that the from-scratch
models reach after 400K steps in 11.7x (DiT) and 46.6x (SiT) fewer steps. This script runs the same comparison
at any size: one MAE pretraining on a latent cache, then for each family (DiT, SiT), each initialisation (USP:
``checkpoint.init_from`` the MAE export, transferred on load; scratch: none) and each seed, the same finetuning
recipe with in-training FID every ``--eval-every`` steps. It writes FID against steps (PNG), a table with the
speed-up (steps the USP run needs to reach the scratch run's final FID, on the seed-mean curves) and the raw
numbers (JSON).

CPU default (about 30 min on 2 cores): the bundled synthetic dataset (3,000 train images, 64 px), the shipped VAE
``synthetic-f8`` and extractor ``usp-synthetic``, vit_tiny_patch_vae -> DiT/SiT-tiny/2-VAE-simple, 3 seeds:

    python benchmarks/convergence/run.py --out runs/convergence --report benchmarks/reports

Real data and sizes on GPUs (one process per GPU; every stage is collective):

    torchrun --nproc_per_node 8 benchmarks/convergence/run.py --out runs/conv_xl --data /data/imagenet \\
        --image-size 256 --vae /weights/sd-vae-ft-ema --mae-model vit_xlarge_patch_vae \\
        --dit-model DiT-XL/2-VAE-simple --sit-model SiT-XL/2-VAE-simple --steps 400000 --eval-every 50000 \\
        --fid-samples 10000 --fid-reference VIRTUAL_imagenet256_labeled.npz --feature-extractor inception-v3-compat \\
        --set engine.name=fsdp2 engine.precision=bf16 data.batch_size=32 eval.inception_weights=/weights/incep.pth \\
        --mae-set schedule.epochs=800 --cache-pre /cache/in256_pre --cache-dit /cache/in256_adm
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

FAMILIES = ("dit", "sit")
INITS = ("usp", "scratch")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder (data, caches, runs, results.json, fid_vs_steps.png)")
    p.add_argument("--report", default="", help="also copy the report (markdown + PNG + JSON) into this folder, "
                   "named convergence_<device>_<date>")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="", help="ImageFolder root with train/ and val/ (default: make the synthetic "
                   "dataset in OUT/data)")
    g.add_argument("--per-class", type=int, default=300, help="synthetic train images per class (default 300)")
    g.add_argument("--val-per-class", type=int, default=40, help="synthetic val images per class (default 40)")
    g.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    g.add_argument("--data-kind", default="styles", choices=["styles", "shapes"],
                   help="the synthetic set made without --data: styles (a shape, colour and texture per class; "
                        "default) or shapes (two shapes in an arrangement, everything else random: the effect "
                        "benchmark's task, usp_scale/data/shapes.py)")
    g.add_argument("--image-size", type=int, default=64, help="image side (default 64)")
    g.add_argument("--vae", default="synthetic-f8", help="vae.path (default: the shipped synthetic-f8)")
    g.add_argument("--cache-pre", default="", help="existing pretraining latent cache (default: write OUT/cache_pre)")
    g.add_argument("--cache-dit", default="", help="existing ADM-crop latent cache (default: write OUT/cache_dit)")
    g.add_argument("--views", type=int, default=2, help="RandomResizedCrop views per image in the pretraining cache")
    g = p.add_argument_group("models and recipes")
    g.add_argument("--mae-model", default="vit_tiny_patch_vae", help="MAE (default vit_tiny_patch_vae)")
    g.add_argument("--mae-ckpt", default="", help="existing MAE export to start from (skips pretraining)")
    g.add_argument("--mae-epochs", type=int, default=20, help="MAE pretraining epochs (default 20)")
    g.add_argument("--mae-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the MAE recipe "
                   "(configs/debug/tiny.yaml)")
    g.add_argument("--dit-model", default="DiT-tiny/2-VAE-simple", help="DiT (default DiT-tiny/2-VAE-simple)")
    g.add_argument("--sit-model", default="SiT-tiny/2-VAE-simple", help="SiT (default SiT-tiny/2-VAE-simple)")
    g.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES, help="dit and/or sit")
    g.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS,
                   help="usp and/or scratch (default both; the report needs both: run subsets in parallel "
                        "processes, then once with both to collect)")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    g.add_argument("--steps", type=int, default=1600, help="finetuning steps of every run (default 1600)")
    g.add_argument("--eval-every", type=int, default=200, help="FID every N steps (default 200)")
    g.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the finetuning recipe "
                   "(configs/debug/tiny_dit.yaml), for both initialisations")
    g = p.add_argument_group("FID")
    g.add_argument("--fid-samples", type=int, default=200, help="samples per FID (default 200)")
    g.add_argument("--fid-reference", default="", help="reference images or statistics (default DATA/val)")
    g.add_argument("--feature-extractor", default="usp-synthetic", help="extractor (default usp-synthetic)")
    g.add_argument("--dit-sampler", default="ddpm:50", help="DiT sampler:steps for FID (default ddpm:50)")
    g.add_argument("--sit-sampler", default="sde:50", help="SiT sampler:steps for FID (default sde:50)")
    g.add_argument("--only-report", action="store_true", help="rebuild the table and plot from OUT/results.json")
    return p


def _rank():
    return int(os.environ.get("RANK", "0"))


def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


SETTINGS = "SETTINGS.json"


def _settings_match(folder: str, settings: dict, own: bool) -> bool:
    """Whether ``folder`` holds a finished stage made with ``settings`` (recorded in folder/SETTINGS.json). One made
    with other settings is removed when this script made it (``own``, it is started fresh and the change named) or
    is refused (a folder the user passed: never deleted)."""
    import shutil

    path = os.path.join(folder, SETTINGS)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        old = json.load(f)
    if old == settings:
        return True
    diff = "; ".join(f"{k}: {old.get(k)} -> {settings.get(k)}" for k in sorted(set(old) | set(settings))
                     if old.get(k) != settings.get(k))
    if not own:
        raise SystemExit(f"{folder} was made with other settings ({diff}); pass another folder or remove it")
    print(f"[convergence] {folder}: settings changed ({diff}); making it fresh", flush=True)
    shutil.rmtree(folder)
    return False


def _record_settings(folder: str, settings: dict) -> None:
    from usp_scale.fileio import write_json
    write_json(os.path.join(folder, SETTINGS), settings)


def prepare(a) -> dict:
    """Dataset, the two latent caches and the MAE export (rank 0 writes; everyone waits). Each records the settings
    it was made with; a rerun with other settings remakes what this script made and refuses folders passed in."""
    from usp_scale.config import load_config
    from usp_scale.training import run

    paths = {"data": a.data or os.path.join(a.out, "data")}
    paths["cache_pre"] = a.cache_pre or os.path.join(a.out, "cache_pre")
    paths["cache_dit"] = a.cache_dit or os.path.join(a.out, "cache_dit")
    data_settings = {"kind": a.data_kind, "classes": a.classes, "per_class": a.per_class,
                     "val_per_class": a.val_per_class, "size": a.image_size, "seed": 0} if not a.data else \
        {"data": os.path.abspath(a.data)}
    if _rank() == 0:
        if not a.data and not _settings_match(paths["data"], data_settings, own=True):
            if a.data_kind == "shapes":
                from usp_scale.data.shapes import make_shapes
                make_shapes(paths["data"], a.per_class, a.val_per_class, 0, a.image_size, 0, progress=True)
            else:
                from usp_scale.data.synthetic import make_synthetic
                make_synthetic(paths["data"], a.classes, a.per_class, a.image_size, a.val_per_class, 0,
                               progress=True)
            _record_settings(paths["data"], data_settings)
        for key, augment, views in (("cache_pre", "pretrain", a.views), ("cache_dit", "adm", 1)):
            if key == "cache_pre" and "usp" not in a.inits and not a.mae_ckpt:
                continue          # only the MAE pretraining reads it
            settings = {"data": data_settings, "vae": a.vae, "augment": augment, "views": views,
                        "image_size": a.image_size}
            own = not getattr(a, key)
            if own:
                ready = _settings_match(paths[key], settings, own=True)
            else:   # a cache passed in: checked if it records its settings, never deleted
                ready = not os.path.isfile(os.path.join(paths[key], SETTINGS)) or \
                    _settings_match(paths[key], settings, own=False)
            if not (ready and os.path.isfile(os.path.join(paths[key], "manifest.json"))):
                import torch

                from usp_scale.data import build_dataset, write_cache, write_manifest
                from usp_scale.vae import FrozenVAE
                dev = "cuda" if torch.cuda.is_available() else "cpu"
                write_cache(build_dataset(paths["data"], "train", "folder"), FrozenVAE(path=a.vae, device=dev),
                            paths[key], image_size=a.image_size, augment=augment, views=views, seed=0,
                            shard_size=1000, batch_size=100, num_workers=0, progress=True)
                write_manifest(paths[key])
                _record_settings(paths[key], settings)
    _barrier()
    paths["mae"] = a.mae_ckpt or os.path.join(a.out, "mae", "export", "model.safetensors")
    if "usp" not in a.inits:      # from scratch only: no MAE (and its cache) to make
        return paths
    if not a.mae_ckpt:
        latent = a.image_size // 8
        overrides = [
            f"output_dir={os.path.join(a.out, 'mae')}", f"data.root={paths['data']}", "data.format=latents",
            f"data.latent_cache={paths['cache_pre']}", f"data.image_size={a.image_size}", f"vae.path={a.vae}",
            f"model.name={a.mae_model}", f"model.img_size={latent}", f"schedule.epochs={a.mae_epochs}",
            "checkpoint.every_steps=0", "progress=false", "log_every=50", *a.mae_set]
        settings = {"overrides": overrides, "cache": _read_settings(paths["cache_pre"])}
        mae_dir = os.path.join(a.out, "mae")
        if _rank() == 0:
            _settings_match(mae_dir, settings, own=True)
        _barrier()
        if not os.path.isfile(os.path.join(mae_dir, SETTINGS)):
            run(load_config(os.path.join(REPO, "configs", "debug", "tiny.yaml"), overrides))
            if _rank() == 0:
                _record_settings(mae_dir, settings)
            _barrier()
    return paths


def _read_settings(folder: str):
    try:
        with open(os.path.join(folder, SETTINGS)) as f:
            return json.load(f)
    except OSError:
        return None


def _file_tag(path: str) -> str:
    """The sha256 of ``path`` (an MAE export; its first 16 hex digits): a remade MAE makes its runs stale."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _done_settings(done: str):
    """The overrides a finished run recorded in its DONE file (None for an older plain-text DONE)."""
    try:
        with open(done) as f:
            return json.load(f).get("overrides")
    except (OSError, ValueError, AttributeError):
        return None


def finetune(a, paths, family: str, init: str, seed: int, *, tag: str = "", extra=(), records: bool = False):
    """One run; returns [(step, fid)] from its metrics.jsonl (with ``records``: (that, the train records)). A run
    that finished before with the same settings is reused; one that finished with other settings is started fresh,
    naming what changed (no stale results). ``tag`` names a variant of the recipe (its folder
    ``{family}_{init}{tag}_seed{seed}``) made by the overrides ``extra`` (after --set; benchmarks/repa/run.py)."""
    import shutil

    from usp_scale.config import load_config
    from usp_scale.training import run

    out = os.path.join(a.out, "runs", f"{family}_{init}{tag}_seed{seed}")
    metrics = os.path.join(out, "metrics.jsonl")
    done = os.path.join(out, "DONE")
    sampler, steps = (a.dit_sampler if family == "dit" else a.sit_sampler).split(":")
    overrides = [
        f"task={family}", f"model.name={a.dit_model if family == 'dit' else a.sit_model}",
        f"model.img_size={a.image_size // 8}", f"model.num_classes={a.classes}", f"output_dir={out}",
        f"data.root={paths['data']}", "data.format=latents", f"data.latent_cache={paths['cache_dit']}",
        f"data.image_size={a.image_size}", f"vae.path={a.vae}", f"seed={seed}",
        f"checkpoint.init_from={paths['mae'] if init == 'usp' else ''}", f"schedule.max_steps={a.steps}",
        "checkpoint.every_steps=0", "checkpoint.export=false", "checkpoint.export_official=false",
        f"eval.fid_every={a.eval_every}", f"eval.fid_samples={a.fid_samples}",
        f"eval.fid_reference={a.fid_reference or os.path.join(paths['data'], 'val')}",
        f"eval.feature_extractor={a.feature_extractor}", f"eval.sampler={sampler}", f"eval.steps={steps}",
        "eval.batch_size=100", "progress=false", "log_every=100", "plot=false", *a.set, *extra,
        # not config keys: what the inputs were made with (a changed MAE or cache makes the run stale too)
        f"#mae={_file_tag(paths['mae']) if init == 'usp' else '-'}",
        f"#cache={json.dumps(_read_settings(paths['cache_dit']), sort_keys=True)}"]
    if os.path.isfile(done):
        old = _done_settings(done)
        if old != overrides:
            if _rank() == 0:
                gone = sorted(set(old or []) - set(overrides))
                new = sorted(set(overrides) - set(old or []))
                print(f"[convergence] {out} finished with other settings ({'; '.join(gone) or 'not recorded'} -> "
                      f"{'; '.join(new) or '-'}): starting it fresh", flush=True)
                shutil.rmtree(out)
            _barrier()
    if not os.path.isfile(done):
        cfg = load_config(os.path.join(REPO, "configs", "debug", "tiny_dit.yaml"),
                          [o for o in overrides if not o.startswith("#")])
        t0 = time.time()
        run(cfg)
        if _rank() == 0:
            with open(done, "w") as f:
                json.dump({"seconds": round(time.time() - t0, 1), "overrides": overrides}, f, indent=1)
        _barrier()
    with open(metrics) as f:
        recs = [json.loads(line) for line in f]
    fid = [(r["step"], r["fid"]) for r in recs if r.get("kind") == "eval" and r.get("metric") == "fid"]
    return (fid, [r for r in recs if r.get("kind") == "train"]) if records else fid


# ----------------------------------------------------------------------------------------------- analysis

def steps_to_reach(curve: list, target: float):
    """First step where the piecewise-linear FID curve [(step, fid)] reaches ``target`` (None if never); a curve
    already below it at its first point gives that step (then the speed-up is a lower bound)."""
    prev = None
    for s, f in curve:
        if f <= target:
            if prev is None:
                return float(s)
            (s0, f0) = prev
            return s0 + (s - s0) * (f0 - target) / (f0 - f)
        prev = (s, f)
    return None


def summarize(results: dict) -> dict:
    """Seed-mean curves, final FIDs and speed-ups per family."""
    import numpy as np

    out = {}
    for family, by_init in results.items():
        curves = {}
        for init, by_seed in by_init.items():
            steps = [s for s, _ in next(iter(by_seed.values()))]
            fids = np.array([[f for _, f in c] for c in by_seed.values()])   # (seeds, evals)
            curves[init] = {"steps": steps, "mean": fids.mean(0).tolist(), "std": fids.std(0, ddof=1).tolist()
                            if len(fids) > 1 else [0.0] * len(steps), "per_seed": fids.tolist()}
        s, u = curves["scratch"], curves["usp"]
        target = s["mean"][-1]
        reach = steps_to_reach(list(zip(u["steps"], u["mean"])), target)
        final = s["steps"][-1]
        per_seed = []
        for su, ss in zip(u["per_seed"], s["per_seed"]):
            r = steps_to_reach(list(zip(u["steps"], su)), ss[-1])
            per_seed.append(None if r is None else final / r)
        diff = np.array(s["per_seed"])[:, -1] - np.array(u["per_seed"])[:, -1]
        # The paper's speed-up assumes scratch's FID improves to its last step. A scratch curve that was already at
        # its final FID earlier (non-monotone: FID rose again) makes "final step / USP's step" measure that curve,
        # not the initialisation; then the fair ratio is first reach against first reach.
        own = steps_to_reach(list(zip(s["steps"], s["mean"])), target)
        out[family] = {"curves": curves, "scratch_final_fid": target, "usp_final_fid": u["mean"][-1],
                       "usp_steps_to_scratch_final": reach,
                       "speedup": None if reach is None else final / reach,
                       "speedup_is_lower_bound": reach is not None and reach <= u["steps"][0],
                       "speedup_per_seed": per_seed, "final_fid_gain_mean": float(diff.mean()),
                       "final_fid_gain_std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                       "scratch_first_reach": own, "scratch_nonmonotone": own < final,
                       "speedup_first_reach": None if reach is None else own / reach}
    return out


def speedup_label(sm: dict) -> str:
    """The speed-up as a short label: "2.00x", ">=5.00x", "not reached", with "(non-monotone scratch curve)"."""
    sp = sm["speedup"]
    text = "not reached" if sp is None else f"{'>=' if sm['speedup_is_lower_bound'] else ''}{sp:.2f}x"
    return text + (" (non-monotone scratch curve)" if sm.get("scratch_nonmonotone") and sp is not None else "")


def speedup_sentence(sm: dict, family: str) -> str:
    """The report's sentence on the speed-up of one family, with the caution a non-monotone scratch curve needs."""
    cs = sm["curves"]["scratch"]
    per = ", ".join("not reached" if x is None else f"{x:.2f}x" for x in sm["speedup_per_seed"])
    reach = sm["usp_steps_to_scratch_final"]
    sp = sm["speedup"]
    text = (f"USP reaches scratch's final FID ({sm['scratch_final_fid']:.2f} at step {cs['steps'][-1]}) at step "
            + ("— (not within the run)" if reach is None else f"{reach:.0f}") + ": **speed-up "
            + ("not reached" if sp is None else f"{'>= ' if sm['speedup_is_lower_bound'] else ''}{sp:.2f}x")
            + f"** on the seed-mean curves (per seed: {per}). Paper (XL/2, ImageNet 256, 400K steps): "
            + ("11.7x" if family == "dit" else "46.6x") + ".")
    if sm.get("scratch_nonmonotone") and sp is not None:
        fr = sm["speedup_first_reach"]
        text += (f" **Caution: this speed-up is an artefact.** The scratch curve is not monotone: it was already at "
                 f"its final FID at step {sm['scratch_first_reach']:.0f} and rose again, so the final step says "
                 f"nothing about how fast scratch gets there; first reach against first reach the ratio is "
                 f"{fr:.2f}x" + (" (USP slower)" if fr < 1 else "") + ". Read the final FIDs instead.")
    return text


def plot(summary: dict, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(summary)
    fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 3.8), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        sm = summary[fam]
        for init, color in (("scratch", "tab:gray"), ("usp", "tab:red")):
            c = sm["curves"][init]
            m, sd = c["mean"], c["std"]
            ax.plot(c["steps"], m, "o-", color=color, label=f"{init} (mean of {len(c['per_seed'])} seeds)")
            ax.fill_between(c["steps"], [x - y for x, y in zip(m, sd)], [x + y for x, y in zip(m, sd)],
                            color=color, alpha=0.2)
        ax.axhline(sm["scratch_final_fid"], color="tab:gray", ls=":", lw=1)
        ax.set_title(f"{fam.upper()}: speed-up {speedup_label(sm)}", fontsize=9)
        ax.set_xlabel("finetuning steps")
        ax.set_ylabel("FID")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(summary: dict, meta: dict, png: str) -> str:
    lines = [f"# Convergence: USP-initialised vs from-scratch DiT / SiT ({meta['date']})", "",
             f"Machine: {meta['machine']}; torch {meta['versions']['torch']}, diffusers "
             f"{meta['versions']['diffusers']}; {meta['wall_minutes']:.1f} min wall; load average at the start "
             f"{meta['load_start']}, at the end {meta['load_end']}.", "",
             f"Command: `{meta['command']}`", "",
             f"Data: {meta['data']}; VAE `{meta['vae']}`; FID with `{meta['feature_extractor']}`, "
             f"{meta['fid_samples']} samples vs {meta['fid_reference']}; seeds {meta['seeds']}; "
             f"MAE `{meta['mae_model']}`; DiT `{meta['dit_model']}`, SiT `{meta['sit_model']}`.", "",
             f"![FID against steps]({os.path.basename(png)})", ""]
    for fam, sm in summary.items():
        cs, cu = sm["curves"]["scratch"], sm["curves"]["usp"]
        lines += [f"## {fam.upper()}", "", "| step | scratch FID (mean ± std) | USP FID (mean ± std) |",
                  "|---|---|---|"]
        for i, st in enumerate(cs["steps"]):
            lines.append(f"| {st} | {cs['mean'][i]:.2f} ± {cs['std'][i]:.2f} | {cu['mean'][i]:.2f} ± "
                         f"{cu['std'][i]:.2f} |")
        lines += ["", f"Scratch final FID {sm['scratch_final_fid']:.2f} at step {cs['steps'][-1]}; USP final FID "
                  f"{sm['usp_final_fid']:.2f} (scratch minus USP per seed: {sm['final_fid_gain_mean']:.2f} ± "
                  f"{sm['final_fid_gain_std']:.2f}). " + speedup_sentence(sm, fam), ""]
    return "\n".join(lines) + "\n"


def _load():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def start(a):
    """The start of a benchmark run over this script's stages: the process group under torchrun (gloo or NCCL),
    then (start time, load average, the data / caches / MAE paths of :func:`prepare`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from usp_scale.runtime import detect, init_process_group, pick_device, resolve_backend
        info = detect()
        init_process_group(info, resolve_backend("auto", pick_device(info)), 30)
    t0, load0 = time.time(), _load()
    return t0, load0, prepare(a)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    res_path = os.path.join(a.out, "results.json")
    if a.only_report:
        with open(res_path) as f:
            doc = json.load(f)
    else:
        import torch

        t0, load0, paths = start(a)
        results = {}
        for family in a.families:
            for init in a.inits:
                for seed in a.seeds:
                    results.setdefault(family, {}).setdefault(init, {})[str(seed)] = \
                        finetune(a, paths, family, init, seed)
        import diffusers

        dev = torch.cuda.get_device_name() if torch.cuda.is_available() else \
            f"CPU {platform.machine()}, {os.cpu_count()} cores"
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": dev, "torch_threads": torch.get_num_threads(),
                "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                             "python": platform.python_version()},
                "command": "python benchmarks/convergence/run.py " + " ".join(argv if argv is not None
                                                                              else sys.argv[1:]),
                "wall_minutes": (time.time() - t0) / 60, "load_start": load0, "load_end": _load(),
                "data": a.data or f"synthetic, {a.classes} classes x {a.per_class} train images, {a.image_size} px",
                "vae": a.vae, "feature_extractor": a.feature_extractor, "fid_samples": a.fid_samples,
                "fid_reference": a.fid_reference or "the val split", "seeds": a.seeds, "steps": a.steps,
                "mae_model": a.mae_model, "dit_model": a.dit_model, "sit_model": a.sit_model}
        doc = {"meta": meta, "results": results}
        if _rank() == 0:
            with open(res_path, "w") as f:
                json.dump(doc, f, indent=1)
    if _rank() != 0:
        return 0
    one_sided = sorted(f for f, by_init in doc["results"].items() if not {"scratch", "usp"} <= set(by_init))
    if one_sided:   # e.g. one job of benchmarks/effect/run.py, which compares once every run has finished
        print(f"results: {res_path}; no comparison or report: {', '.join(one_sided)} ran with one initialisation "
              "(the speed-up needs --inits scratch usp)", flush=True)
        return 0
    summary = summarize(doc["results"])
    doc["summary"] = summary
    m = doc["meta"]
    png = plot(summary, os.path.join(a.out, "fid_vs_steps.png"),
               f"{m['dit_model']} / {m['sit_model']} on {m['data']}; {m['machine']}, {m['date']}")
    md = markdown(summary, m, png)
    finish_report(a, doc, res_path, png, md, "convergence")
    return 0


def finish_report(a, doc: dict, res_path: str, png: str, md: str, name: str) -> None:
    """The end of a benchmark run: OUT/report.md and the results (with their summary) written, the report printed,
    and with ``--report DIR`` published there (:func:`publish_report`)."""
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(md)
    with open(res_path, "w") as f:
        json.dump(doc, f, indent=1)
    print(md)
    if a.report:
        publish_report(a.report, name, doc["meta"], png, res_path, md)


def publish_report(folder: str, name: str, meta: dict, png: str, res_path: str, md: str) -> str:
    """Copy a benchmark's plot, results and report into ``folder`` as ``<name>_<device>_<date>.{png,json,md}`` (the
    device: "cpu" or the card's last word), the report's image link renamed with it. Another run's report of that
    name stays: this one takes the next free ``_2``, ``_3``, ... Returns the path without extension."""
    import shutil

    tag = "cpu" if meta["machine"].startswith("CPU") else meta["machine"].split()[-1].lower()
    stem = base = os.path.join(folder, f"{name}_{tag}_{meta['date']}")
    k = 2
    while os.path.exists(base + ".md"):
        base, k = f"{stem}_{k}", k + 1
    os.makedirs(folder, exist_ok=True)
    shutil.copy(png, base + ".png")
    shutil.copy(res_path, base + ".json")
    with open(base + ".md", "w") as f:
        f.write(md.replace(f"]({os.path.basename(png)})", f"]({os.path.basename(base)}.png)"))
    print(f"report: {base}.md")
    return base


if __name__ == "__main__":
    sys.exit(main())
