#!/usr/bin/env python
"""What the project's engines actually send per optimizer step, counted on a gloo run, against the model's count.

    torchrun --nproc_per_node 2 benchmarks/scaling/measure_comm.py --out DIR [--cases ddp_fp32,fsdp2,...] \
        [--models MAE-tiny,DiT-tiny/2]
    python benchmarks/scaling/measure_comm.py --compare DIR/comm_w2.json [DIR/comm_w4.json ...] [--md OUT.md]

Each case builds the real tiny model and its task loss (``benchmarks/train/bench_step.py``'s recipe: synthetic
latents, fused-free AdamW) through ``usp_scale.engine.build_engine`` exactly as the trainer does, runs 3 warm-up
steps (DDP rebuilds its buckets, ZeRO-3 records its trace), then records one step with ``torch.profiler``.

How the collectives are seen on gloo (checked on torch 2.14): no ``record_param_comms`` events are emitted; every
ProcessGroup call, including those DDP's C++ reducer makes, shows as a ``c10d::<op>`` dispatcher event, and gloo
adds a ``gloo:<algorithm>`` event with the input's shape and dtype. Single-tensor ops (``_allgather_base_``,
``_reduce_scatter_base_``) carry shapes and dtype on the ``c10d`` event itself (output and input, so the group size is
their ratio); gloo runs a reduce-scatter as an all-reduce of the input, whose ``gloo:all_reduce`` event is then set
aside. Tensor-list ops (``allreduce_``, ``broadcast_``, ``reduce_``, ``allgather_``) take shape and dtype from the
remaining ``gloo:`` events of the same algorithm, in order (their counts must agree, else the run is refused). The
group of an all-reduce is not on the event: a wrapper around ``torch.distributed.all_reduce`` records it for calls
from Python (FSDP2, DeepSpeed, DDP's comm hooks); those from DDP's C++ reducer run on DDP's group, the world.

The comparison (``--compare``): for every case the model's collectives (``comm_model.step_ops`` on the same model,
built on the meta device) against the measured ones, per-rank sent bytes with the ring factors of the model on both
sides. Small control all-reduces the model leaves out (<= 256 elements: gradient-norm partials, overflow flags) are
listed and counted in the measured total. Tolerance: the collectives match one to one (kind, group size, elements,
dtype), except DDP, whose bucket boundaries follow autograd's order (the model takes reverse registration order):
there the number of buckets and the total per dtype must match, and ZeRO-3, which coalesces a fetch's gathers into
one call: there the totals per kind must match; and the per-rank bytes agree within 0.5 %.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "train"))
sys.path.insert(0, REPO)

from scaling import comm_model as M  # noqa: E402

CONTROL_NUMEL = 256
TOLERANCE = 0.005
GLOO_DTYPES = {"float": "fp32", "c10::BFloat16": "bf16", "c10::Half": "fp16", "double": "fp64", "unsigned char": "u8",
               "bool": "u8", "int": "i32", "long int": "i64"}
TORCH_DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float64": "fp64"}

# case -> (engine config fields, comm_model.EngineSpec fields), as the engine is configured on the CPU
CASES = {
    "ddp_fp32": (dict(name="ddp", reduce_dtype="fp32"), dict(kind="ddp", reduce_dtype="fp32")),
    "ddp_bf16": (dict(name="ddp", reduce_dtype="bf16"), dict(kind="ddp", reduce_dtype="bf16")),
    "fsdp2": (dict(name="fsdp2"), dict(kind="fsdp2", param_dtype="fp32")),
    "fsdp2_noreshard": (dict(name="fsdp2", reshard_after_forward=False),
                        dict(kind="fsdp2", param_dtype="fp32", reshard_after_forward=False)),
    "fsdp2_bf16": (dict(name="fsdp2", precision="bf16"), dict(kind="fsdp2", param_dtype="bf16")),
    "hsdp": (dict(name="fsdp2", fsdp_shard_size=2), dict(kind="hsdp", param_dtype="fp32", shard_size=2)),
    "zero1": (dict(name="deepspeed", zero_stage=1), dict(kind="zero1", param_dtype="fp32", reduce_dtype="fp32")),
    "zero2": (dict(name="deepspeed", zero_stage=2), dict(kind="zero2", param_dtype="fp32", reduce_dtype="fp32")),
    "zero2_bf16": (dict(name="deepspeed", zero_stage=2, precision="bf16"),
                   dict(kind="zero2", param_dtype="bf16", reduce_dtype="fp32")),  # engine.reduce_dtype=fp32
    "zero3": (dict(name="deepspeed", zero_stage=3), dict(kind="zero3", param_dtype="fp32", reduce_dtype="fp32")),
    # every parameter gathered in forward; kept for backward (within the reuse distance)
    "zero3_p0": (dict(name="deepspeed", zero_stage=3, ds_user={"zero_optimization": {
        "stage3_param_persistence_threshold": 0}}), dict(kind="zero3", param_dtype="fp32", reduce_dtype="fp32",
                                                          ds_persistence=0)),
    # no reuse distance: only the prefetch window keeps parameters, not the top-level module's own
    "zero3_p0_r0": (dict(name="deepspeed", zero_stage=3, ds_user={"zero_optimization": {
        "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0}}),
        dict(kind="zero3", param_dtype="fp32", reduce_dtype="fp32", ds_persistence=0, ds_max_reuse=0)),
    # neither: every parameter gathered in forward and again in backward
    "zero3_p0_r0_nopf": (dict(name="deepspeed", zero_stage=3, ds_user={"zero_optimization": {
        "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}}),
        dict(kind="zero3", param_dtype="fp32", reduce_dtype="fp32", ds_persistence=0, ds_max_reuse=0,
             ds_prefetch_bucket=0)),
}
WORLD4_ONLY = {"hsdp"}


# ------------------------------------------------------------------------------------------------ counting

def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def parse_events(events, ar_groups, world: int) -> list:
    """Collectives of a profiled region from kineto events (``profiler.kineto_results.events()``): dicts with kind,
    size (group), numel, dtype. ``ar_groups``: [(numel, dtype, group size)] of Python all-reduce calls, in order."""
    ev = sorted((e for e in events if e.name().startswith(("c10d::", "gloo:"))), key=lambda e: e.start_ns())
    gloo = [e for e in ev if e.name().startswith("gloo:")]
    used = set()

    def take(algo, numel=None):
        for i, g in enumerate(gloo):
            if i in used or g.name() != f"gloo:{algo}":
                continue
            if numel is not None and sum(_numel(s) for s in g.shapes()) != numel:
                continue
            used.add(i)
            return g
        raise RuntimeError(f"no gloo:{algo} event{'' if numel is None else f' of {numel} elements'} for a c10d op")

    out, pending = [], []
    for e in ev:
        n = e.name()
        if not n.startswith("c10d::"):
            continue
        op = n[len("c10d::"):].rstrip("_")
        if op in ("_allgather_base", "_reduce_scatter_base"):
            o, i = _numel(e.shapes()[0]), _numel(e.shapes()[1])
            dt = GLOO_DTYPES[e.dtypes()[0]]
            if op == "_allgather_base":
                take("all_gather", i)
                out.append(dict(kind="all_gather", size=o // i, numel=o, dtype=dt))
            else:
                take("reduce_scatter" if any(x.name() == "gloo:reduce_scatter" for x in gloo) else "all_reduce", i)
                out.append(dict(kind="reduce_scatter", size=i // o, numel=i, dtype=dt))
        elif op in ("allreduce", "broadcast", "reduce", "allgather"):
            pending.append(op)
        elif op in ("barrier", "monitored_barrier"):
            continue
        else:
            raise RuntimeError(f"collective c10d::{op} is not counted by this script")
    algo = {"allreduce": "all_reduce", "broadcast": "broadcast", "reduce": "reduce", "allgather": "all_gather"}
    rest = collections.defaultdict(list)
    for i, g in enumerate(gloo):
        if i not in used:
            rest[g.name()[len("gloo:"):]].append(g)
    want = collections.Counter(algo[o] for o in pending)
    have = {k: len(v) for k, v in rest.items()}
    if dict(want) != {k: v for k, v in have.items() if v}:
        raise RuntimeError(f"c10d list ops {dict(want)} do not pair with the remaining gloo events {have}")
    ars = list(ar_groups)
    for kind, gs in rest.items():
        for g in gs:
            numel, dt = sum(_numel(s) for s in g.shapes()), GLOO_DTYPES[g.dtypes()[0]]
            size = world
            if kind == "all_reduce":
                for j, (an, adt, asz) in enumerate(ars):
                    if an == numel and adt == dt:
                        size = asz
                        del ars[j]
                        break
            if kind == "all_gather":
                numel *= size
            out.append(dict(kind=kind, size=size, numel=numel, dtype=dt))
    return out


class AllReduceGroups:
    """Records (numel, dtype, group size) of every ``torch.distributed.all_reduce`` call from Python while active."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        import torch.distributed as dist

        self._orig = dist.all_reduce

        def wrapped(tensor, *a, **kw):
            group = kw.get("group", a[1] if len(a) > 1 else None)
            dt = TORCH_DTYPES.get(str(tensor.dtype), str(tensor.dtype))
            self.calls.append((tensor.numel(), dt, dist.get_world_size(group)))
            return self._orig(tensor, *a, **kw)

        dist.all_reduce = wrapped
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        dist.all_reduce = self._orig


def measure_case(case: str, short: str, rank: int, world: int, out: str) -> list:
    """Collectives of one steady-state optimizer step of ``short`` under engine ``case`` (on this rank)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_step import MODELS, synthetic_batch
    from usp_scale.config import JobConfig
    from usp_scale.engine import build_engine
    from usp_scale.training.optim import build_optimizer
    from usp_scale.training.tasks import build_task

    eng_kw, _ = CASES[case]
    eng_kw = dict(eng_kw)
    ds_user = eng_kw.pop("ds_user", None)
    task_name, reg, side = MODELS[short]
    cfg = JobConfig()
    cfg.task, cfg.model.name, cfg.model.img_size = task_name, reg, side
    cfg.engine.precision = eng_kw.pop("precision", "fp32")
    for k, v in eng_kw.items():
        setattr(cfg.engine, k, v)
    if ds_user:
        path = os.path.join(out, f"ds_{case}.json")
        if rank == 0:
            with open(path, "w") as f:
                json.dump(ds_user, f)
        torch.distributed.barrier()
        cfg.engine.deepspeed_config = path
    cfg.data.batch_size = 2
    cfg.optim.fused = False
    task = build_task(cfg)
    torch.manual_seed(0)
    model = task.build_model()  # attention: plain SDPA (the default spec), the same in every process
    dev = torch.device("cpu")
    eng = build_engine(cfg.engine, model, lambda m: build_optimizer(cfg.optim, task.param_groups(m), dev),
                       micro_batch=cfg.data.batch_size)
    batch = synthetic_batch(cfg, dev)

    def step():
        with eng.sync_context(), eng.autocast():
            loss = task.loss(eng, batch)
        eng.backward(loss)
        return eng.step()

    for _ in range(3):
        step()
    torch.distributed.barrier()
    with AllReduceGroups() as ar, profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        res = step()
    if res is None or not res.applied:
        raise RuntimeError(f"{case}/{short}: the profiled step was not an applied optimizer step")
    ops = parse_events(prof.profiler.kineto_results.events(), ar.calls, world)
    eng.close()
    return ops


def worker(out: str, cases: list, models: list) -> None:
    import torch.distributed as dist

    from usp_scale.config import JobConfig
    from usp_scale.runtime import init_runtime

    base = JobConfig()
    base.engine.name, base.engine.backend = "ddp", "gloo"  # the process group every case's engine runs on
    info = init_runtime(base, device="cpu").info
    res = {"world": info.world_size, "cases": {}}
    for short in models:
        for case in cases:
            if case in WORLD4_ONLY and info.world_size < 4:
                continue
            ops = measure_case(case, short, info.rank, info.world_size, out)
            every = [None] * info.world_size
            dist.all_gather_object(every, sorted(tuple(sorted(o.items())) for o in ops))
            res["cases"][f"{case}@{short}"] = {"ops": ops, "ranks_agree": all(e == every[0] for e in every)}
    if info.rank == 0:
        import torch

        res["torch"] = torch.__version__
        try:
            import deepspeed

            res["deepspeed"] = deepspeed.__version__
        except ImportError:
            res["deepspeed"] = None
        with open(os.path.join(out, f"comm_w{info.world_size}.json"), "w") as f:
            json.dump(res, f)
    dist.barrier()
    print("MEASURE_COMM_OK", info.rank, flush=True)


# ------------------------------------------------------------------------------------------------ comparison

def _ring(o: dict) -> float:
    return M.ring_send_bytes(o["kind"], o["size"], o["numel"] * M.DTYPE_BYTES[o["dtype"]])


def compare_case(case: str, short: str, world: int, measured: list, nets: dict, spec_kw: dict = None) -> dict:
    """Model vs measured for one case: matched collectives, per-rank sent bytes, verdict. ``spec_kw``: model the
    case with these EngineSpec fields instead of its own (a check that a wrong model is caught)."""
    if short not in nets:
        nets[short] = M.build_net(short)
    spec = M.EngineSpec(**(spec_kw or CASES[case][1]))
    model_ops = M.step_ops(nets[short], spec, world)
    control = [o for o in measured if o["kind"] == "all_reduce" and o["numel"] <= CONTROL_NUMEL]
    big = [o for o in measured if o not in control]
    mk = collections.Counter(op.key() for op in model_ops)
    gk = collections.Counter((o["kind"], o["size"], o["numel"], o["dtype"]) for o in big)
    model_b = M.sent_bytes(model_ops)
    meas_b = sum(_ring(o) for o in measured)
    if spec.kind in ("ddp", "zero3"):
        def totals(c):
            t = collections.Counter()
            for (k, s, n, d), cnt in c.items():
                t[(k, s, d)] += n * cnt
            return t, sum(c.values()) if spec.kind == "ddp" else 0
        one_to_one = totals(mk) == totals(gk)
    else:
        one_to_one = mk == gk
    rel = abs(model_b - meas_b) / meas_b if meas_b else float(model_b != 0)
    return {"case": case, "model": short, "world": world, "engine": spec.describe(),
            "model_ops": sum(mk.values()), "measured_ops": len(big), "control_ops": len(control),
            "control_bytes": sum(_ring(o) for o in control), "model_bytes": model_b, "measured_bytes": meas_b,
            "rel_diff": rel, "ops_match": one_to_one, "ok": one_to_one and rel <= TOLERANCE,
            "only_model": sorted((mk - gk).elements()), "only_measured": sorted((gk - mk).elements())}


def compare_files(paths: list) -> list:
    nets, rows = {}, []
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        for name, r in res["cases"].items():
            case, short = name.split("@", 1)
            row = compare_case(case, short, res["world"], r["ops"], nets)
            row["ok"] = row["ok"] and r["ranks_agree"]
            row["ranks_agree"] = r["ranks_agree"]
            rows.append(row)
    return rows


def markdown_table(rows: list) -> str:
    lines = ["| engine case | model | ranks | collectives model / measured (+ control) | model KiB/rank | "
             "measured KiB/rank | diff | match |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} ({r['engine']}) | {r['model']} | {r['world']} | {r['model_ops']} / "
                     f"{r['measured_ops']} (+{r['control_ops']}) | {r['model_bytes'] / 1024:.1f} | "
                     f"{r['measured_bytes'] / 1024:.1f} | {100 * r['rel_diff']:.3f} % | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="worker mode (under torchrun): write OUT/comm_w<world>.json (OUT is created)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--models", default="MAE-tiny,DiT-tiny/2", help="comma list of bench_step.py model names")
    ap.add_argument("--compare", nargs="*", help="comm_w*.json files to check against the model")
    ap.add_argument("--md", help="with --compare: write the validation table here")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; unused")
    a = ap.parse_args(argv)
    if a.compare:
        rows = compare_files(a.compare)
        md = markdown_table(rows)
        print(md)
        if a.md:
            os.makedirs(os.path.dirname(os.path.abspath(a.md)), exist_ok=True)
            with open(a.md, "w") as f:
                f.write(md)
        bad = [r for r in rows if not r["ok"]]
        for r in bad:
            print(f"MISMATCH {r['case']}@{r['model']} w{r['world']}: only model {r['only_model']}, "
                  f"only measured {r['only_measured']}")
        return 1 if bad else 0
    if not a.out:
        ap.error("give --out DIR (worker, under torchrun) or --compare FILES")
    cases = [c for c in a.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {unknown}; use {', '.join(CASES)}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("DS_BUILD_OPS", "0")
    os.makedirs(a.out, exist_ok=True)  # every rank, before the first case writes into it (exist_ok: no race)
    worker(a.out, cases, [m for m in a.models.split(",") if m])
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed on CPU occasionally aborts in its exit handlers after success


if __name__ == "__main__":
    sys.exit(main())
