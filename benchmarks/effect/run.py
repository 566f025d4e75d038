#!/usr/bin/env python
"""What USP is for, measured: the pretrained encoder against the same encoder without the pretraining, on a task
where the representation matters by construction, at equal finetuning compute, several seeds, with spreads.

The task is ``usp_scale/data/shapes.py``: ten classes, each a glyph's shape or arrangement of parts (disc, ring,
square, frame, triangle, bar, plus, tee, ell, pair), with colour, texture, size, rotation, position, background
and clutter drawn independently of the class; a large pool (``train/``) that the MAE reads without
labels and the class-conditional DiT/SiT read with them, a few labels per class for the probes and the
label-scarce finetuning (``labeled/``, one disjoint set per seed), and a held-out ``val/``. Latents come from the
shipped VAE ``shapes-f8`` and FID from the shipped extractor ``usp-shapes``, both trained on another draw of the
same task (dataset seed 1; this benchmark uses seed 0).

One MAE pretraining (``vit_tiny_patch_vae`` on the pool's 2-view latent cache), then, for every seed:

1. **linear probe** (``configs/debug/tiny_linprobe.yaml``: BatchNorm + linear head on the frozen cls token) of the
   pretrained encoder and of the same encoder randomly initialised (the seed's initialisation);
2. **k-NN** (cosine, k = ``--knn-k``, temperature-weighted votes) on the same frozen features;
3. **label-scarce finetuning** (``configs/debug/tiny_finetune.yaml``, task=cls) from the MAE and from scratch, the
   same steps;
4. **DiT and SiT** (``benchmarks/convergence/run.py`` on this task) from the MAE and from scratch, the same steps,
   FID every ``--eval-every`` steps; the speed-up is the paper's: steps the USP run needs to reach the scratch
   run's final FID (per seed too).

Equal compute means equal finetuning steps, as in the paper (its speed-ups count diffusion steps only); the
pretraining's cost is reported beside it (CPU seconds), so a reader can also compare the totals.

    python benchmarks/effect/run.py --out runs/effect --report benchmarks/reports     # 27.5 min on 2 quiet cores

Every job (data, caches, MAE, each run) records the settings it ran with (OUT/stages/); a rerun reuses the jobs
whose settings are unchanged and starts the others fresh, naming what changed. Results: OUT/results.json, the report
OUT/results.md and its plot OUT/results.png (``--report DIR`` copies them). ``--jobs 2`` runs two jobs at a time
(one thread each): jobs that do not need the MAE (the baselines) run while it trains. Logs: OUT/logs/.
``benchmarks/effect/sweep.py`` varies the model size, the pretraining length and the pool size around this setup.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
PY = sys.executable
INITS = ("usp", "random")
LAB_AUGMENT = "adm"     # the augmentation the labelled and val caches are written with (and the probes read)


def report_base(folder: str, date: str, tag: str = "", rewrite: bool = False) -> str:
    """The report's path without extension: ``effect_cpu_<date>[_<tag>]`` in ``folder``; unless ``rewrite``, another
    run's report of that name stays and this one takes the next free ``_2``, ``_3``, ..."""
    base = os.path.join(folder, f"effect_cpu_{date}" + (f"_{tag}" if tag else ""))
    stem, k = base, 2
    while not rewrite and os.path.exists(base + ".md"):
        base, k = f"{stem}_{k}", k + 1
    return base


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder (data, caches, runs, stages/, logs/, results.json)")
    p.add_argument("--report", default="", help="also write the report (markdown + PNGs + JSON) into this folder, "
                   "named effect_cpu_<date>[_<report-tag>]")
    p.add_argument("--report-tag", default="", help="suffix of the report's name, so that two settings run on one "
                   "day keep both reports (e.g. mae100 -> effect_cpu_<date>_mae100); without it, a report of the same "
                   "name from another run is kept and this one gets the next free _2, _3, ... (--only-report rewrites)")
    p.add_argument("--jobs", type=int, default=2, help="jobs at a time, one thread each (default 2: the 2 cores)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2); seed k uses "
                   "labelled set k, the k-th random initialisation and the k-th finetuning streams")
    p.add_argument("--only", nargs="+", default=["repr", "finetune", "gen"], choices=["repr", "finetune", "gen"],
                   help="comparisons to run (default all three; repr = linear probe + k-NN)")
    p.add_argument("--only-report", action="store_true", help="rebuild the report from OUT/results.json")
    p.add_argument("--results", default="", help="results file (default OUT/results.json; the report's markdown and "
                   "PNG go beside it with the same name)")
    p.add_argument("--fresh", action="store_true", help="redo every job, even those finished with the same "
                   "settings (a code change alone does not redo finished jobs)")
    p.add_argument("--data-dir", default="", help="where the dataset and the latent caches live, with their own "
                   "stages/ records (default OUT; the sweep shares one between its points)")
    g = p.add_argument_group("data (usp_scale/data/shapes.py)")
    g.add_argument("--pool-per-class", type=int, default=1000, help="pool images per class (default 1000: 10,000)")
    g.add_argument("--labeled-per-class", type=int, default=25, help="labels per class per seed (default 25: 2.5 "
                   "%% of the pool, between ImageNet's 1 %% and 10 %% label splits)")
    g.add_argument("--val-per-class", type=int, default=50, help="held-out images per class (default 50)")
    g.add_argument("--image-size", type=int, default=64, help="image side (default 64: 8x8x4 latents)")
    g.add_argument("--data-seed", type=int, default=0, help="dataset seed (default 0; the shipped VAE and extractor "
                   "were trained on seed 1)")
    g.add_argument("--vae", default="shapes-f8", help="vae.path (default: the shipped shapes-f8)")
    g.add_argument("--feature-extractor", default="usp-shapes", help="FID extractor (default usp-shapes)")
    g.add_argument("--views", type=int, default=2, help="RandomResizedCrop views per pool image (default 2)")
    g.add_argument("--crop-scale-min", type=float, default=0.2, help="RandomResizedCrop lower scale of the "
                   "pretraining views (default 0.2, the paper's)")
    g = p.add_argument_group("pretraining")
    g.add_argument("--mae-model", default="vit_tiny_patch_vae", help="MAE (default vit_tiny_patch_vae)")
    g.add_argument("--vit-model", default="", help="the classifier of the same shape (default: from --mae-model, "
                   "vit_X_patch_vae -> vit_X_patch16_vae)")
    g.add_argument("--mae-epochs", type=int, default=40, help="MAE epochs over the pool (default 40)")
    g.add_argument("--mae-set", nargs="*", default=["optim.blr=4.0e-3", "schedule.warmup_epochs=2"],
                   metavar="KEY=VALUE", help="overrides of the MAE recipe (configs/debug/tiny.yaml; default "
                   "optim.blr=4.0e-3 schedule.warmup_epochs=2: lr 1e-3 at batch 64)")
    g.add_argument("--mae-ckpt", default="", help="an existing MAE export (skips the pretraining)")
    g = p.add_argument_group("representation: linear probe and k-NN")
    g.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs over the labelled set "
                   "(default 100)")
    g.add_argument("--probe-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the probe recipe (configs/debug/tiny_linprobe.yaml)")
    g.add_argument("--knn-k", type=int, default=10, help="neighbours of the k-NN classifier (default 10)")
    g.add_argument("--readout", default="avg", choices=["avg", "token"],
                   help="features of the probe and the k-NN: avg = the mean of the patch tokens (default; a 2-block "
                        "MAE's cls token carries almost nothing at this scale), token = the cls token after the "
                        "final norm (the official probe's)")
    g = p.add_argument_group("label-scarce finetuning")
    g.add_argument("--ft-epochs", type=int, default=50, help="finetuning epochs over the labelled set (default 50)")
    g.add_argument("--ft-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the finetuning recipe (configs/debug/tiny_finetune.yaml)")
    g = p.add_argument_group("generation (benchmarks/convergence/run.py)")
    g.add_argument("--families", nargs="+", default=["dit", "sit"], choices=["dit", "sit"], help="dit and/or sit")
    g.add_argument("--dit-model", default="DiT-tiny/2-VAE-simple", help="DiT (default DiT-tiny/2-VAE-simple)")
    g.add_argument("--sit-model", default="SiT-tiny/2-VAE-simple", help="SiT (default SiT-tiny/2-VAE-simple)")
    g.add_argument("--gen-steps", type=int, default=2000, help="finetuning steps of every DiT/SiT run (default 2000)")
    g.add_argument("--eval-every", type=int, default=400, help="FID every N steps (default 400)")
    g.add_argument("--fid-samples", type=int, default=300, help="samples per FID (default 300, against the 500 val "
                   "images)")
    g.add_argument("--gen-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the DiT/SiT recipe (configs/debug/tiny_dit.yaml), for both initialisations")
    return p


# ------------------------------------------------------------------------------------------------ bookkeeping

def _load():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def _commit() -> str:
    try:
        c = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO).returncode != 0
        return c.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sha_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class Stages:
    """Settings records of the jobs (OUT/stages/<name>.json): reuse what is unchanged, restart what changed. The
    settings are a job's command, recipe files (sha256) and inputs (the records of the jobs it reads); the commit
    it ran at is recorded beside them, not compared (a code change does not redo hours of finished runs: the report
    lists the commits, ``--fresh`` redoes everything)."""

    commit = "unknown"
    fresh = False       # --fresh: every job runs again (its outputs removed first)

    def __init__(self, out: str):
        self.dir = os.path.join(out, "stages")
        os.makedirs(self.dir, exist_ok=True)

    def _path(self, name):
        return os.path.join(self.dir, name.replace("/", "_") + ".json")

    def record(self, name) -> Optional[dict]:
        try:
            with open(self._path(name)) as f:
                return json.load(f)
        except OSError:
            return None

    def tag(self, name) -> str:
        """A short hash of a finished job's record (what a later job's settings name as their input)."""
        r = self.record(name)
        return "none" if r is None else hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:12]

    def begin(self, name: str, settings: dict, outputs: List[str]) -> bool:
        """True when job ``name`` must run: fresh (outputs removed, the changes printed) when its last run had other
        settings, resumed when an interrupted run had the same ones; False when it finished with these settings."""
        r = self.record(name)
        if r is not None and r.get("done") and r["settings"] == settings and not self.fresh:
            return False
        if r is not None and (r["settings"] != settings or self.fresh):
            old = r["settings"]
            diff = [f"{k}: {old.get(k)} -> {settings.get(k)}" for k in sorted(set(old) | set(settings))
                    if old.get(k) != settings.get(k)]
            print(f"[effect] {name}: " + ("--fresh" if not diff else "settings changed since its last run") +
                  ", starting it fresh" + "".join("\n    " + d for d in diff), flush=True)
            for o in outputs:
                if os.path.isdir(o):
                    shutil.rmtree(o)
                elif os.path.exists(o):
                    os.remove(o)
        self._write(name, {"settings": settings, "done": False, "commit": self.commit})
        return True

    def finish(self, name: str, **info) -> None:
        r = self.record(name)
        self._write(name, dict(r, done=True, **info))

    def _write(self, name, rec):
        from usp_scale.fileio import write_json
        write_json(self._path(name), rec)


class Job:
    def __init__(self, name: str, settings, outputs: List[str], *, cmd: Optional[List[str]] = None,
                 fn: Optional[Callable[[], None]] = None, deps=(), log: str = "", stages: Optional[Stages] = None):
        self.name, self.settings, self.outputs, self.cmd, self.fn = name, settings, outputs, cmd, fn
        self.deps, self.log, self.stages = list(deps), log, stages
        self.proc, self.t0, self.logf = None, 0.0, None


def run_jobs(jobs: List[Job], stages: Stages, parallel: int) -> Dict[str, float]:
    """Run the jobs (commands as subprocesses, ``parallel`` at a time; functions in this process) in dependency
    order. A job runs only if :meth:`Stages.begin` says so; its settings may name a dependency's record, so they
    are computed (and compared) only once the dependencies finished. Returns {job: seconds} of the jobs run."""
    pending, running, finished, seconds = list(jobs), [], set(), {}
    names = {j.name for j in jobs}
    for j in jobs:
        j.stages = j.stages or stages
        missing = [d for d in j.deps if d not in names]
        if missing:
            raise ValueError(f"job {j.name} depends on unknown jobs {missing}")
    while pending or running:
        for j in list(running):
            rc = j.proc.poll()
            if rc is None:
                continue
            j.logf.close()
            running.remove(j)
            if rc != 0:
                for k in running:
                    k.proc.terminate()
                tail = open(j.log).read()[-3000:]
                raise SystemExit(f"[effect] job {j.name} failed (exit {rc}); the end of its log {j.log}:\n{tail}")
            seconds[j.name] = time.time() - j.t0
            j.stages.finish(j.name, seconds=round(seconds[j.name], 1), load_end=_load())
            finished.add(j.name)
            print(f"[effect] {time.strftime('%H:%M:%S')} done {j.name} ({seconds[j.name]:.0f} s)", flush=True)
        started = False
        for j in list(pending):
            if len(running) >= parallel:
                break
            if any(d not in finished for d in j.deps):
                continue
            pending.remove(j)
            settings = j.settings() if callable(j.settings) else j.settings
            if not j.stages.begin(j.name, settings, j.outputs):
                finished.add(j.name)
                print(f"[effect] reusing {j.name} (finished with the same settings)", flush=True)
                started = True
                continue
            print(f"[effect] {time.strftime('%H:%M:%S')} start {j.name} (load {_load()})", flush=True)
            j.t0 = time.time()
            if j.fn is not None:
                j.fn()
                seconds[j.name] = time.time() - j.t0
                j.stages.finish(j.name, seconds=round(seconds[j.name], 1))
                finished.add(j.name)
                print(f"[effect] {time.strftime('%H:%M:%S')} done {j.name} ({seconds[j.name]:.0f} s)", flush=True)
            else:
                os.makedirs(os.path.dirname(j.log), exist_ok=True)
                j.logf = open(j.log, "w")
                j.logf.write("$ " + " ".join(shlex.quote(c) for c in j.cmd) + "\n")
                j.logf.flush()
                env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
                j.proc = subprocess.Popen(j.cmd, cwd=REPO, stdout=j.logf, stderr=subprocess.STDOUT, env=env)
                running.append(j)
            started = True
        if not started and running:
            time.sleep(1.0)
        elif not started and not running and pending:
            raise SystemExit(f"[effect] jobs {[j.name for j in pending]} wait on jobs that never finished")
    return seconds


# ------------------------------------------------------------------------------------------------ the jobs

def vit_name(a) -> str:
    if a.vit_model:
        return a.vit_model
    if not a.mae_model.endswith("_patch_vae"):
        raise SystemExit(f"--mae-model {a.mae_model}: give the classifier of the same shape with --vit-model")
    return a.mae_model[: -len("_patch_vae")] + "_patch16_vae"


def paths_of(a) -> dict:
    o, d = a.out, a.data_dir or a.out
    return {"data_dir": d, "data": os.path.join(d, "data"), "cache_pre": os.path.join(d, "cache_pre"),
            "cache_dit": os.path.join(d, "cache_dit"), "cache_val": os.path.join(d, "cache_val"),
            "mae_dir": os.path.join(o, "mae"),
            "mae": a.mae_ckpt or os.path.join(o, "mae", "export", "model.safetensors"),
            "gen": os.path.join(o, "gen"), "logs": os.path.join(o, "logs")}


def cache_lab(a, k: int) -> str:
    return os.path.join(a.data_dir or a.out, f"cache_labeled_{k}")


def make_data(a, P):
    from usp_scale.data.shapes import make_shapes

    make_shapes(P["data"], a.pool_per_class, a.val_per_class, a.labeled_per_class, a.image_size, a.data_seed,
                progress=True, labeled_sets=max(a.seeds) + 1)


def make_caches(a, P):
    import torch

    from usp_scale.data import build_dataset, write_cache, write_manifest
    from usp_scale.data.shapes import labeled_split
    from usp_scale.vae import FrozenVAE

    torch.set_num_threads(1)
    vae = FrozenVAE(path=a.vae)
    todo = [("cache_pre", "train", "pretrain", a.views), ("cache_dit", "train", "adm", 1),
            ("cache_val", "val", LAB_AUGMENT, 1)]
    todo += [(f"lab{k}", labeled_split(k), LAB_AUGMENT, 1) for k in a.seeds]
    for key, split, augment, views in todo:
        out = cache_lab(a, int(key[3:])) if key.startswith("lab") else P[key]
        write_cache(build_dataset(P["data"], split, "folder"), vae, out, image_size=a.image_size, augment=augment,
                    crop_scale_min=a.crop_scale_min, views=views, seed=0, shard_size=2000, batch_size=100,
                    num_workers=0, progress=False)
        write_manifest(out)
        print(f"[effect] cache {out}: {split}, {augment}, {views} view(s)", flush=True)


def mae_cmd(a, P) -> List[str]:
    latent = a.image_size // 8
    return [PY, "launchers/pretrain.py", "--config", "configs/debug/tiny.yaml", f"output_dir={P['mae_dir']}",
            f"data.root={P['data']}", "data.format=latents", f"data.latent_cache={P['cache_pre']}",
            f"data.image_size={a.image_size}", f"vae.path={a.vae}", f"model.name={a.mae_model}",
            f"model.img_size={latent}", f"schedule.epochs={a.mae_epochs}", "data.batch_size=64",
            "checkpoint.every_steps=500", "checkpoint.keep_last=1", "progress=false", "log_every=50", *a.mae_set]


def cls_cmd(a, P, task: str, init: str, k: int, out: str) -> List[str]:
    """A linear probe (task linprobe) or a finetuning (task cls) on labelled set k, seed k. Both name the labelled
    cache's augmentation (the probe recipe's own, eval, is not what the cache holds, and the loader refuses a cache
    made with another augmentation than the job's)."""
    cfg = "configs/debug/tiny_linprobe.yaml" if task == "linprobe" else "configs/debug/tiny_finetune.yaml"
    epochs = a.probe_epochs if task == "linprobe" else a.ft_epochs
    extra = a.probe_set if task == "linprobe" else a.ft_set
    return [PY, "launchers/finetune.py", "--config", cfg, f"output_dir={out}", f"data.root={P['data']}",
            "data.format=latents", f"data.latent_cache={cache_lab(a, k)}", f"data.latent_cache_val={P['cache_val']}",
            "data.latent_sample=false", "data.drop_last=false", f"data.image_size={a.image_size}",
            f"data.augment={LAB_AUGMENT}",
            f"vae.path={a.vae}", f"model.name={vit_name(a)}", f"model.img_size={a.image_size // 8}", f"seed={k}",
            f"schedule.epochs={epochs}", f"checkpoint.init_from={P['mae'] if init == 'usp' else ''}",
            "checkpoint.every_steps=0", "checkpoint.export=false", "checkpoint.export_official=false",
            f"model.global_pool={a.readout if task == 'linprobe' else 'avg'}",
            "progress=false", "plot=false", "log_every=20", *extra]


def gen_args(a, P) -> List[str]:
    return ["--out", P["gen"], "--data", P["data"], "--cache-pre", P["cache_pre"], "--cache-dit", P["cache_dit"],
            "--mae-ckpt", P["mae"], "--vae", a.vae, "--feature-extractor", a.feature_extractor,
            "--fid-reference", os.path.join(P["data"], "val"), "--image-size", str(a.image_size),
            "--dit-model", a.dit_model, "--sit-model", a.sit_model, "--steps", str(a.gen_steps),
            "--eval-every", str(a.eval_every), "--fid-samples", str(a.fid_samples)] + \
        (["--set", *a.gen_set] if a.gen_set else [])


def build_jobs(a, P, stages: Stages) -> List[Job]:
    dstages = Stages(P["data_dir"]) if P["data_dir"] != a.out else stages
    jobs = [Job("data", {"pool_per_class": a.pool_per_class, "val_per_class": a.val_per_class,
                         "labeled_per_class": a.labeled_per_class, "labeled_sets": max(a.seeds) + 1,
                         "size": a.image_size, "seed": a.data_seed,
                         "generator": _sha_file(os.path.join(REPO, "usp_scale", "data", "shapes.py"))},
                [P["data"]], fn=lambda: make_data(a, P), stages=dstages)]
    caches = [P["cache_pre"], P["cache_dit"], P["cache_val"]] + [cache_lab(a, k) for k in a.seeds]
    jobs.append(Job("caches", lambda: {"vae": a.vae, "views": a.views, "crop_scale_min": a.crop_scale_min,
                                       "seeds": a.seeds, "data": dstages.tag("data")},
                    caches, fn=lambda: make_caches(a, P), deps=["data"], stages=dstages))
    mae_dep = []
    if not a.mae_ckpt:
        jobs.append(Job("mae", lambda: {"cmd": mae_cmd(a, P)[2:], "recipe": _sha_file(
            os.path.join(REPO, "configs", "debug", "tiny.yaml")), "caches": dstages.tag("caches")},
            [P["mae_dir"]], cmd=mae_cmd(a, P), deps=["caches"], log=os.path.join(P["logs"], "mae.log")))
        mae_dep = ["mae"]
    mae_tag = (lambda: stages.tag("mae")) if not a.mae_ckpt else (lambda: _sha_file(a.mae_ckpt))
    for task, what in (("linprobe", "repr"), ("cls", "finetune")):
        if what not in a.only:
            continue
        cfg = "tiny_linprobe.yaml" if task == "linprobe" else "tiny_finetune.yaml"
        for k in a.seeds:
            for init in INITS:
                name = f"{task}_{init}_seed{k}"
                out = os.path.join(a.out, "runs", name)
                cmd = cls_cmd(a, P, task, init, k, out)
                settings = (lambda cmd=cmd, init=init, cfg=cfg: {
                    "cmd": cmd[2:], "recipe": _sha_file(os.path.join(REPO, "configs", "debug", cfg)),
                    "caches": dstages.tag("caches"), "mae": mae_tag() if init == "usp" else "-"})
                jobs.append(Job(name, settings, [out], cmd=cmd, deps=["caches"] + (mae_dep if init == "usp" else []),
                                log=os.path.join(P["logs"], name + ".log")))
    if "repr" in a.only:
        jobs.append(Job("knn", lambda: {"k": a.knn_k, "seeds": a.seeds, "vit": vit_name(a), "mae": mae_tag(),
                                        "caches": dstages.tag("caches")},
                        [os.path.join(a.out, "knn.json")], fn=lambda: knn_all(a, P), deps=["caches"] + mae_dep))
    if "gen" in a.only:
        gen_names = []
        for fam in a.families:
            for init in ("usp", "scratch"):
                for k in a.seeds:
                    name = f"{fam}_{init}_seed{k}"
                    cmd = [PY, "benchmarks/convergence/run.py", *gen_args(a, P), "--families", fam, "--inits", init,
                           "--seeds", str(k)]
                    settings = (lambda cmd=cmd, init=init: {
                        "cmd": cmd[2:], "caches": dstages.tag("caches"), "mae": mae_tag() if init == "usp" else "-",
                        "recipe": _sha_file(os.path.join(REPO, "configs", "debug", "tiny_dit.yaml"))})
                    jobs.append(Job("gen_" + name, settings, [os.path.join(P["gen"], "runs", name)], cmd=cmd,
                                    deps=["caches"] + (mae_dep if init == "usp" else []),
                                    log=os.path.join(P["logs"], "gen_" + name + ".log")))
                    gen_names.append("gen_" + name)
        cmd = [PY, "benchmarks/convergence/run.py", *gen_args(a, P), "--families", *a.families, "--seeds",
               *[str(k) for k in a.seeds]]
        jobs.append(Job("gen_collect", lambda: {"runs": [stages.tag(n) for n in gen_names]},
                        [os.path.join(P["gen"], "results.json")], cmd=cmd, deps=gen_names,
                        log=os.path.join(P["logs"], "gen_collect.log")))
    return jobs


# ------------------------------------------------------------------------------------------------ k-NN

def encoder_features(a, P, init: str, k: int, cache: str):
    """Frozen features (``--readout``: what the linear probe reads) of every record of
    ``cache`` (view 0, not flipped, posterior mean) and their labels, for the pretrained encoder or the one
    randomly initialised with seed ``k`` (the linear probe's initialisation)."""
    import numpy as np
    import torch

    from usp_scale.data import LatentCache
    from usp_scale.models import create_model
    from usp_scale.transfer import load_pretrained
    from usp_scale.vae.named import shipped_scale

    torch.manual_seed(k)
    model = create_model(vit_name(a), img_size=a.image_size // 8, in_chans=4, num_classes=10,
                         global_pool=a.readout, linprobe=True)
    if init == "usp":
        load_pretrained(model, P["mae"])
    model.eval()
    c = LatentCache(cache)
    idx = np.arange(len(c))
    mean, _, labels, _ = c.gather(idx, np.zeros_like(idx), np.zeros_like(idx))
    z = torch.as_tensor(np.asarray(mean, dtype=np.float32)) * (shipped_scale(a.vae) or 0.18215)
    with torch.no_grad():
        f = torch.cat([model.forward_head(model.forward_features(z[i:i + 256]), pre_logits=True)
                       for i in range(0, len(z), 256)])
    return f, torch.as_tensor(np.asarray(labels)).long()


def knn_top1(ftr, ytr, fva, yva, k: int, temperature: float = 0.07, classes: int = 10) -> float:
    """Cosine k-NN with exp(similarity / T) weighted votes (as DINO's evaluation)."""
    import torch
    import torch.nn.functional as F

    sim = F.normalize(fva, dim=1) @ F.normalize(ftr, dim=1).T
    v, i = sim.topk(min(k, len(ftr)), dim=1)
    votes = torch.zeros(len(fva), classes).scatter_add_(1, ytr[i], (v / temperature).exp())
    return float((votes.argmax(1) == yva).float().mean()) * 100


def knn_all(a, P):
    import torch

    torch.set_num_threads(1)
    res = {}
    for k in a.seeds:
        for init in INITS:
            ftr, ytr = encoder_features(a, P, init, k, cache_lab(a, k))
            fva, yva = encoder_features(a, P, init, k, P["cache_val"])
            res[f"{init}_seed{k}"] = knn_top1(ftr, ytr, fva, yva, a.knn_k)
            print(f"[effect] k-NN {init} seed {k}: {res[f'{init}_seed{k}']:.2f} %", flush=True)
    from usp_scale.fileio import write_json
    write_json(os.path.join(a.out, "knn.json"), res)


# ------------------------------------------------------------------------------------------------ results

def _eval_top1(out: str) -> float:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    ev = [r for r in recs if r.get("kind") == "eval" and "top1" in r]
    if not ev:
        raise SystemExit(f"{out}/metrics.jsonl has no top-1 record")
    return float(ev[-1]["top1"])


def collect(a, P, stages: Stages) -> dict:
    """Every comparison's per-seed values from the runs' outputs."""
    res = {"comparisons": {}}
    for task, what, base in (("linprobe", "linear probe", "random"), ("cls", "label-scarce finetuning", "random")):
        if ("repr" if task == "linprobe" else "finetune") not in a.only:
            continue
        vals = {init: [_eval_top1(os.path.join(a.out, "runs", f"{task}_{init}_seed{k}")) for k in a.seeds]
                for init in INITS}
        res["comparisons"][task] = {"what": f"{what} top-1 (%)", "usp": vals["usp"],
                                    "baseline": vals["random"],
                                    "baseline_name": "random init" if task == "linprobe" else "from scratch",
                                    "higher_is_better": True}
    if "repr" in a.only:
        with open(os.path.join(a.out, "knn.json")) as f:
            kn = json.load(f)
        res["comparisons"]["knn"] = {"what": f"{a.knn_k}-NN top-1 (%)", "usp": [kn[f"usp_seed{k}"] for k in a.seeds],
                                     "baseline": [kn[f"random_seed{k}"] for k in a.seeds],
                                     "baseline_name": "random init", "higher_is_better": True}
    if "gen" in a.only:
        with open(os.path.join(P["gen"], "results.json")) as f:
            res["convergence"] = json.load(f)
    recs = {os.path.basename(p)[:-5]: stages.record(os.path.basename(p)[:-5])
            for p in sorted(os.listdir(stages.dir)) if p.endswith(".json")}
    res["seconds"] = {n: (r or {}).get("seconds") for n, r in recs.items()}
    res["commits"] = sorted({(r or {}).get("commit", "unknown") for r in recs.values()})
    return res


def _convergence():
    """benchmarks/convergence/run.py as a module (its report sentences; both scripts are named run.py)."""
    import importlib.util

    if "convergence_run" not in sys.modules:
        spec = importlib.util.spec_from_file_location("convergence_run",
                                                      os.path.join(REPO, "benchmarks", "convergence", "run.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["convergence_run"] = mod
    return sys.modules["convergence_run"]


def stats(usp: list, base: list, higher_is_better: bool) -> dict:
    import numpy as np

    u, b = np.array(usp, float), np.array(base, float)
    d = (u - b) if higher_is_better else (b - u)
    sd = lambda x: float(x.std(ddof=1)) if len(x) > 1 else 0.0
    return {"usp_mean": float(u.mean()), "usp_std": sd(u), "base_mean": float(b.mean()), "base_std": sd(b),
            "gain_mean": float(d.mean()), "gain_std": sd(d), "wins": int((d > 0).sum()), "n": len(d)}


def plot(res: dict, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = res["comparisons"]
    conv = res.get("convergence", {}).get("summary", {})
    n = len(comps) + len(conv)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(3.4 * max(n, 1), 3.6), squeeze=False)
    i = 0
    for key, c in comps.items():
        ax = axes[0][i]
        i += 1
        for x, (name, vals, col) in enumerate((("USP", c["usp"], "tab:red"),
                                                (c["baseline_name"], c["baseline"], "tab:gray"))):
            ax.scatter([x] * len(vals), vals, color=col, zorder=3)
            ax.bar([x], [sum(vals) / len(vals)], color=col, alpha=0.35, width=0.6)
        ax.set_xticks([0, 1], ["USP", c["baseline_name"]])
        ax.set_title(c["what"], fontsize=9)
        ax.axhline(10, color="k", lw=0.6, ls=":")   # chance
    for fam, sm in conv.items():
        ax = axes[0][i]
        i += 1
        for init, color in (("scratch", "tab:gray"), ("usp", "tab:red")):
            cc = sm["curves"][init]
            m, sd = cc["mean"], cc["std"]
            ax.plot(cc["steps"], m, "o-", color=color, label=f"{init} ({len(cc['per_seed'])} seeds)")
            ax.fill_between(cc["steps"], [x - y for x, y in zip(m, sd)], [x + y for x, y in zip(m, sd)],
                            color=color, alpha=0.2)
        ax.set_title(f"{fam.upper()} FID: speed-up {_convergence().speedup_label(sm)}", fontsize=9)
        ax.set_xlabel("finetuning steps")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(res: dict, meta: dict, png: str) -> str:
    L = [f"# What USP is for: pretrained vs not, on a task where the representation matters ({meta['date']})", "",
         f"Machine: {meta['machine']}; torch {meta['versions']['torch']}; {meta['wall_minutes']:.1f} min wall with "
         f"{meta['jobs']} job(s) at a time (one thread each); load average at the start {meta['load_start']}, at the "
         f"end {meta['load_end']} (other users' jobs included). Commit {meta['commit']}.", "",
         f"Command: `{meta['command']}`", "",
         f"Task: `usp_scale/data/shapes.py` (a glyph's shape or arrangement of parts defines the class; colour, "
         f"texture, size, rotation, position, background and clutter random), {meta['data']}; VAE `{meta['vae']}`, FID extractor "
         f"`{meta['feature_extractor']}`. MAE `{meta['mae_model']}`, {meta['mae_epochs']} epochs over the pool "
         f"({meta['mae_seconds']} s); encoder `{meta['vit_model']}`; seeds {meta['seeds']} (seed k: labelled set k, "
         "the k-th random initialisation and training streams).", "",
         f"![comparisons]({os.path.basename(png)})", "",
         "| comparison | USP (mean ± std) | baseline (mean ± std) | USP − baseline per seed | USP better in | "
         "per seed (USP / baseline) |", "|---|---|---|---|---|---|"]
    for key, c in res["comparisons"].items():
        s = stats(c["usp"], c["baseline"], c["higher_is_better"])
        per = ", ".join(f"{u:.1f} / {b:.1f}" for u, b in zip(c["usp"], c["baseline"]))
        L.append(f"| {c['what']} | {s['usp_mean']:.2f} ± {s['usp_std']:.2f} | {c['baseline_name']}: "
                 f"{s['base_mean']:.2f} ± {s['base_std']:.2f} | {s['gain_mean']:+.2f} ± {s['gain_std']:.2f} | "
                 f"{s['wins']} of {s['n']} seeds | {per} |")
    conv = res.get("convergence", {}).get("summary", {})
    for fam, sm in conv.items():
        fin_u = [c[-1] for c in sm["curves"]["usp"]["per_seed"]]
        fin_s = [c[-1] for c in sm["curves"]["scratch"]["per_seed"]]
        s = stats(fin_u, fin_s, higher_is_better=False)
        per = ", ".join(f"{u:.1f} / {b:.1f}" for u, b in zip(fin_u, fin_s))
        L.append(f"| {fam.upper()} final FID (lower is better) | {s['usp_mean']:.2f} ± {s['usp_std']:.2f} | "
                 f"from scratch: {s['base_mean']:.2f} ± {s['base_std']:.2f} | {s['gain_mean']:+.2f} ± "
                 f"{s['gain_std']:.2f} (FID saved) | {s['wins']} of {s['n']} seeds | {per} |")
    conv_mod = _convergence()
    for fam, sm in conv.items():
        cs, cu = sm["curves"]["scratch"], sm["curves"]["usp"]
        L += ["", f"**{fam.upper()}**: " + conv_mod.speedup_sentence(sm, fam), "",
              "| step | scratch FID | USP FID |", "|---|---|---|"]
        for i, st in enumerate(cs["steps"]):
            L.append(f"| {st} | {cs['mean'][i]:.2f} ± {cs['std'][i]:.2f} | {cu['mean'][i]:.2f} ± {cu['std'][i]:.2f} |")
    if res.get("commits"):
        L += ["", "The jobs ran at commit(s) " + ", ".join(res["commits"]) + "."]
    secs = {k: v for k, v in res.get("seconds", {}).items() if v}
    if secs:
        L += ["", "Wall seconds per job (with the load above): " +
              ", ".join(f"{k} {v:.0f}" for k, v in sorted(secs.items())) + "."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    P = paths_of(a)
    Stages.commit, Stages.fresh = _commit(), a.fresh
    stages = Stages(a.out)
    res_path = a.results or os.path.join(a.out, "results.json")
    stem = os.path.splitext(res_path)[0]
    if a.only_report:
        with open(res_path) as f:
            doc = json.load(f)
        conv = doc["results"].get("convergence")
        if conv and conv.get("results"):   # the analysis of today's code (e.g. the non-monotone-curve check)
            conv["summary"] = _convergence().summarize(conv["results"])
    else:
        t0, load0 = time.time(), _load()
        jobs = build_jobs(a, P, stages)
        run_jobs(jobs, stages, a.jobs)
        import torch

        res = collect(a, P, stages)
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"CPU {platform.machine()}, {os.cpu_count()} cores",
                "versions": {"torch": torch.__version__, "python": platform.python_version()},
                "command": "python benchmarks/effect/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "wall_minutes": (time.time() - t0) / 60, "load_start": load0, "load_end": _load(), "jobs": a.jobs,
                "commit": _commit(), "seeds": a.seeds, "vae": a.vae, "feature_extractor": a.feature_extractor,
                "data": f"pool {a.pool_per_class} x 10 images, {a.labeled_per_class} labels per class per seed, val "
                        f"{a.val_per_class} x 10, {a.image_size} px, dataset seed {a.data_seed}",
                "mae_model": a.mae_model, "vit_model": vit_name(a), "mae_epochs": a.mae_epochs,
                "mae_seconds": (stages.record("mae") or {}).get("seconds", "n/a"),
                "args": {k: v for k, v in vars(a).items() if k not in ("out", "report")}}
        doc = {"meta": meta, "results": res}
        from usp_scale.fileio import write_json
        write_json(res_path, doc)
    m = doc["meta"]
    png = plot(doc["results"], stem + ".png",
               f"USP vs baselines on the shapes task; {m['mae_model']}; {m['machine']}, {m['date']}")
    md = markdown(doc["results"], m, png)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
    if a.report:
        base = report_base(a.report, m["date"], a.report_tag, a.only_report)
        os.makedirs(a.report, exist_ok=True)
        shutil.copy(png, base + ".png")
        shutil.copy(res_path, base + ".json")
        with open(base + ".md", "w") as f:
            f.write(md.replace(f"]({os.path.basename(png)})", f"]({os.path.basename(base)}.png)"))
        print(f"report: {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
