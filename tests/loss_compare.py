#!/usr/bin/env python
"""Per-step losses of fixed short runs, per engine: compare two commits or two configs, or the stored goldens.

Three recipes, all on ``configs/debug/synthetic_pretrain.yaml`` (random latents, no files): ``pretrain`` (the tiny
MAE), ``dit`` (DiT-tiny/2, DDPM) and ``repa`` (REPA's SiT-tiny/2-REPA with the shipped teacher synthetic-vit run
online on a random picture per sample; its alignment loss ``proj_loss`` is recorded too), CPU, fp32, fixed seeds,
6 optimizer steps of 2 micro-batches, clipping and EMA on. Each engine runs in its own launch: ``local``
(1 process), ``ddp``, ``fsdp2`` and ``deepspeed`` (ZeRO-2) on 2 gloo processes, one thread each. Every step's loss and gradient norm is recorded.

    python tests/loss_compare.py                         # the working tree vs the goldens in tests/assets/losses/
    python tests/loss_compare.py --a main --b .          # commit/branch main vs the working tree
    python tests/loss_compare.py --a . --b . --b-set optim.clip_grad=0.5   # two configs of the same code
    python tests/loss_compare.py --update-golden         # rewrite tests/assets/losses/ from the working tree

A commit is checked out into a temporary git worktree and run from there (its own usp_scale). Exit status 0
when every step agrees within the tolerance (--rtol/--atol; default exact for two commits, which are run on this
machine; GOLDEN_RTOL against the stored goldens, written on another), 1 otherwise. The goldens are checked
by tests/test_golden_losses.py; a change that moves them is a decision: regenerate with --update-golden and say
why in the commit message.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this file is tests/loss_compare.py
GOLDEN = os.path.join(REPO, "tests", "assets", "losses")
BASE = "configs/debug/synthetic_pretrain.yaml"
OK = "LOSS_RUN_OK"

COMMON = ["engine.precision=fp32", "engine.ddp_bf16_grads=false", "data.synthetic_samples=48", "data.batch_size=4",
          "schedule.accum_iter=2", "schedule.max_steps=6", "schedule.warmup_steps=2", "ema.decay=0.9",
          "optim.fused=false", "optim.clip_grad=1.0", "checkpoint.every_steps=0", "checkpoint.export=false",
          "checkpoint.export_official=false", "log_every=1", "progress=false", "plot=false", "seed=0"]
RUNS = {
    "pretrain": [],
    "dit": ["task=dit", "model.name=DiT-tiny/2", "model.num_classes=10", "schedule.name=constant", "optim.lr=1e-3",
            "optim.weight_decay=0.0"],
    # REPA's SiT (its time convention) + the shipped teacher synthetic-vit run online on a random picture per sample
    # (64 px -> 56 px, 16 tokens = SiT-tiny/2's on the 8x8 latents): the alignment loss is recorded too
    "repa": ["task=sit", "model.name=SiT-tiny/2-REPA", "model.learn_sigma=false", "model.num_classes=10",
             "schedule.name=constant", "optim.lr=1e-3", "optim.weight_decay=0.0", "repa.enabled=true",
             "repa.teacher=synthetic-vit", "repa.teacher_path=synthetic-vit", "repa.features=online",
             "repa.encoder_depth=1", "repa.projector_dim=64"],
}
ENGINES = {  # name -> (processes, overrides)
    "local": (1, ["engine.name=local"]),
    "ddp": (2, ["engine.name=ddp"]),
    "fsdp2": (2, ["engine.name=fsdp2"]),
    "deepspeed": (2, ["engine.name=deepspeed", "engine.zero_stage=2"]),
}
# Tolerances (relative, per step) against the stored goldens. Bit-exactness is guaranteed only for the same code
# on the same machine (the --a/--b comparison, exact by default). The recorded environment (torch, instruction set,
# threads) does not capture the CPU model or oneDNN/MKL's code paths: on another CPU with an equal record the losses
# were seen to differ by 8.6e-8 (loss) and 1.2e-7 (grad_norm) relative. A real change of the numerics (masking,
# a random stream, the loss, the optimizer) moves them by 1e-3 and more, so 1e-5 keeps the test's purpose.
GOLDEN_RTOL = {"local": 1e-5, "ddp": 1e-5, "fsdp2": 1e-5, "deepspeed": 1e-5}
# When the recorded environment differs (another torch, another instruction set), kernels sum in another order.
CROSS_ENV_RTOL = {"local": 1e-4, "ddp": 1e-4, "fsdp2": 1e-4, "deepspeed": 1e-4}
FIELDS = ("loss", "grad_norm", "proj_loss")   # proj_loss: the REPA run's only


def environment() -> dict:
    """What decides bit-exactness: torch version, CPU instruction set, threads per process."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads_per_process": 1, "machine": platform.machine()}


# ------------------------------------------------------------------------------------------------ worker

def worker(out: str, engine: str, runs: list, sets: list) -> None:
    """One launch (1 or 2 processes): every run of ``runs`` on ``engine``; rank 0 writes out/<engine>.json."""
    import torch

    torch.set_num_threads(1)
    from usp_scale.config import load_config
    from usp_scale.training import run

    result, rank = {}, int(os.environ.get("RANK", "0"))
    for name in runs:
        d = os.path.join(out, f"{engine}_{name}")
        base = os.path.join(os.environ.get("USP_LOSS_CODE", REPO), BASE)   # the recipe of the code under test
        cfg = load_config(base, COMMON + RUNS[name] + ENGINES[engine][1] + list(sets) + [f"output_dir={d}"])
        run(cfg)
        if rank == 0:
            with open(os.path.join(d, "metrics.jsonl")) as f:
                recs = [json.loads(line) for line in f]
            recs = [r for r in recs if r.get("kind") == "train"]
            result[name] = {k: [r[k] for r in recs] for k in FIELDS if k in recs[0]}
            result[name]["steps"] = [r["step"] for r in recs]
    if rank == 0:
        with open(os.path.join(out, f"{engine}.json"), "w") as f:
            json.dump(result, f)
    if ENGINES[engine][0] > 1:
        import torch.distributed as dist

        dist.barrier()
    print(OK, rank, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collect(code_root: str, engines: list, runs: list, sets: list = (), timeout: int = 600) -> dict:
    """Run the recipes with the usp_scale found at ``code_root``; {engine: {run: {loss, grad_norm, steps}}}."""
    env = dict(os.environ, PYTHONPATH=code_root, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", DS_BUILD_OPS="0",
               HF_HUB_OFFLINE="1", TRITON_INTERPRET="1", USP_LOSS_CODE=code_root)
    env.pop("RANK", None)
    out = {}
    with tempfile.TemporaryDirectory(prefix="loss_compare_") as tmp:
        for eng in engines:
            n = ENGINES[eng][0]
            args = [os.path.abspath(__file__), "_worker", "--out", tmp, "--engine", eng, "--runs", *runs]
            if sets:
                args += ["--set", *sets]
            if n == 1:
                cmd = [sys.executable] + args
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
                       "127.0.0.1", "--master_port", str(_free_port())] + args
            p = subprocess.run(cmd, cwd=code_root, env=env, capture_output=True, text=True, timeout=timeout)
            if p.stdout.count(OK) != n:
                raise RuntimeError(f"the {eng} launch failed (rc {p.returncode}, code at {code_root}):\n"
                                   f"{(p.stdout + p.stderr)[-4000:]}")
            with open(os.path.join(tmp, f"{eng}.json")) as f:
                out[eng] = json.load(f)
    return out


@contextlib.contextmanager
def checkout(ref: str):
    """'.' -> the working tree; anything else -> a detached temporary git worktree of that commit."""
    if ref == ".":
        yield REPO
        return
    tmp = tempfile.mkdtemp(prefix="loss_compare_src_")
    path = os.path.join(tmp, "src")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", path, ref], check=True, capture_output=True,
                   text=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", path], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ compare

def compare(a: dict, b: dict, rtol: float = 0.0, atol: float = 0.0) -> list:
    """Differences between two {run: {field: [per step]}}: one dict per (run, field) that differs anywhere;
    ``ok`` False where a step is outside |a - b| <= atol + rtol * |b| (or the lengths differ)."""
    rows = []
    for run in sorted(set(a) | set(b)):
        for field in FIELDS:
            xa, xb = a.get(run, {}).get(field), b.get(run, {}).get(field)
            if xa is None and xb is None and (run in a or run in b) and field != "loss":
                continue   # a field that this run does not record (proj_loss outside REPA)
            if xa is None or xb is None or len(xa) != len(xb):
                rows.append({"run": run, "field": field, "ok": False, "first_step": None,
                             "note": f"lengths {None if xa is None else len(xa)} vs {None if xb is None else len(xb)}"})
                continue
            diffs = [(i, x, y) for i, (x, y) in enumerate(zip(xa, xb)) if x != y]
            if not diffs:
                continue
            bad = [(i, x, y) for i, x, y in diffs if not abs(x - y) <= atol + rtol * abs(y)]
            rel = max(abs(x - y) / max(abs(y), 1e-30) for _, x, y in diffs)
            i, x, y = (bad or diffs)[0]
            rows.append({"run": run, "field": field, "ok": not bad, "first_step": i + 1, "a": x, "b": y,
                         "max_rel": rel, "steps_differing": len(diffs)})
    return rows


def report(name_a: str, name_b: str, res_a: dict, res_b: dict, rtol: float, atol: float) -> bool:
    ok = True
    for eng in res_a:
        rows = compare(res_a[eng], res_b.get(eng, {}), rtol, atol)
        if not rows:
            n = len(next(iter(res_a[eng].values()))["loss"])
            print(f"{eng:10s} identical ({', '.join(sorted(res_a[eng]))}; {n} steps each)")
        for r in rows:
            ok &= r["ok"]
            if r.get("note"):
                print(f"{eng:10s} {r['run']:8s} {r['field']:9s} DIFFERENT: {r['note']}")
                continue
            tag = "within tolerance" if r["ok"] else "DIFFERENT"
            print(f"{eng:10s} {r['run']:8s} {r['field']:9s} {tag}: first at step {r['first_step']} "
                  f"({name_a} {r['a']!r} vs {name_b} {r['b']!r}), max rel diff {r['max_rel']:.3g}, "
                  f"{r['steps_differing']} steps differ")
    return ok


def read_golden(engine: str) -> dict:
    path = os.path.join(GOLDEN, f"{engine}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no golden losses {path}; write them with `python tests/loss_compare.py "
                                "--update-golden`")
    with open(path) as f:
        return json.load(f)


def write_golden(results: dict) -> None:
    os.makedirs(GOLDEN, exist_ok=True)
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    for eng, runs in results.items():
        doc = {"engine": eng, "processes": ENGINES[eng][0], "environment": environment(),
               "written_from": commit + (" + uncommitted changes" if dirty else ""),
               "date": time.strftime("%Y-%m-%d"), "command": "python tests/loss_compare.py --update-golden",
               "config": {"base": BASE, "common": COMMON, "engine": ENGINES[eng][1],
                          "runs": {r: RUNS[r] for r in runs}}, "losses": runs}
        with open(os.path.join(GOLDEN, f"{eng}.json"), "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"wrote {os.path.join(GOLDEN, eng + '.json')}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default=".", help="code for side A: '.' (the working tree, default) or a commit/branch")
    p.add_argument("--b", default=None, help="code for side B: '.' or a commit/branch (default: the stored goldens "
                   "in tests/assets/losses/)")
    p.add_argument("--a-set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for side A's runs")
    p.add_argument("--b-set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for side B's runs")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES), help="engines to run")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="recipes to run")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance per step (default: 0, exact, when "
                   "both sides run here; the engine's GOLDEN_RTOL against the stored goldens)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance per step (default 0)")
    p.add_argument("--json", default=None, help="also write both sides' losses to this JSON file")
    p.add_argument("--update-golden", action="store_true",
                   help="run side A (the working tree unless --a) and write its losses as the goldens")
    return p


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_worker":
        w = argparse.ArgumentParser()
        w.add_argument("_worker")
        w.add_argument("--out", required=True)
        w.add_argument("--engine", required=True, choices=list(ENGINES))
        w.add_argument("--runs", nargs="+", required=True)
        w.add_argument("--set", nargs="*", default=[])
        w.add_argument("--local_rank", type=int, default=-1)
        a = w.parse_args()
        sys.path.insert(0, os.environ.get("USP_LOSS_CODE", REPO))
        worker(a.out, a.engine, a.runs, a.set)
        sys.stdout.flush()
        os._exit(0)  # DeepSpeed on CPU occasionally aborts in its exit handlers after success
    a = build_parser().parse_args(argv)
    if a.update_golden:
        if a.a_set:
            raise SystemExit("--update-golden writes the recipes as they are; --a-set is not allowed with it")
        with checkout(a.a) as root:
            write_golden(collect(root, a.engines, a.runs))
        return 0
    with checkout(a.a) as root:
        res_a = collect(root, a.engines, a.runs, a.a_set)
    if a.b is None:
        name_b = "golden"
        res_b = {e: read_golden(e)["losses"] for e in a.engines}
    else:
        name_b = f"b={a.b}"
        with checkout(a.b) as root:
            res_b = collect(root, a.engines, a.runs, a.b_set)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"a": res_a, "b": res_b}, f, indent=1)
    if a.rtol is not None:
        rtol = a.rtol
    else:  # the goldens were written on another machine: exactness is not guaranteed there (see GOLDEN_RTOL)
        rtol = max(GOLDEN_RTOL[e] for e in a.engines) if a.b is None else 0.0
    ok = report(f"a={a.a}", name_b, res_a, res_b, rtol, a.atol)
    print("all steps agree" if ok else "the losses differ (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
