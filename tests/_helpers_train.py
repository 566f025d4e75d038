"""Helpers for the training-system tests: engine runs on a real tiny model and multi-process workers.

Run as a worker under torchrun:  python tests/_helpers_train.py {equiv,resume} --out DIR [--engines ...]
Each worker writes DIR/<mode>.json on rank 0 and prints TRAIN_HELPER_OK when every rank finished.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OK = "TRAIN_HELPER_OK"


def finish(out: str, filename: str, results, rank: int) -> None:
    """End of a multi-process worker: rank 0 writes ``results`` as JSON to out/filename, every rank waits for the
    others, then prints the success marker the tests count."""
    import torch.distributed as dist

    if rank == 0:
        with open(os.path.join(out, filename), "w") as f:
            json.dump(results, f)
    dist.barrier()
    print(OK, rank, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group():
    """The default gloo process group of a worker (also for one process, as the engines need one), as
    usp_scale.runtime.init_runtime creates it; returns this process's DistInfo."""
    from usp_scale.runtime import detect, init_process_group

    info = detect()
    init_process_group(info, "gloo", 30, single_process_group=True)
    return info


def child_env() -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", DS_BUILD_OPS="0", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def torchrun(args: list, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port())] + args
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------- engine runs

def engine_model() -> nn.Module:
    """The real tiny classifier (vit_tiny_patch16_vae on 4x8x8 latents, 10 classes): no dropout or drop-path,
    so its forward is deterministic, and it has ``blocks`` for FSDP2."""
    from usp_scale.models import create_model

    return create_model("vit_tiny_patch16_vae", img_size=8, in_chans=4, num_classes=10)


def engine_data(steps: int, accum: int, global_batch: int):
    """Latents (micro, global_batch, 4, 8, 8) and labels (micro, global_batch) from a fixed pool, so runs of
    different lengths see the same first batches."""
    g = torch.Generator().manual_seed(7)
    n = 16
    assert steps * accum <= n
    x = torch.randn(n, global_batch, 4, 8, 8, generator=g)
    y = torch.randint(0, 10, (n, global_batch), generator=g)
    return x[: steps * accum], y[: steps * accum]


def inject_inf(eng, rank: int, world: int, name: str = "head.weight", row: int = 5) -> None:
    """Put +inf into one gradient element, ``name[row, 0]`` of the full gradient, as an fp16 overflow in that
    element would: in the full (replicated) gradient for local/ddp, and only in the shard of the rank that owns
    the row for fsdp2 (dim-0 shards of ceil(rows / world) rows)."""
    p = dict(eng.unwrapped.named_parameters())[name]
    g = p.grad
    if hasattr(g, "to_local"):  # FSDP2: a DTensor sharded on dim 0
        per = -(-p.shape[0] // world)
        if rank == row // per:
            g.to_local()[row - rank * per, 0] = float("inf")
    else:
        g[row, 0] = float("inf")


def engine_losses(engine_cfg, *, steps=4, accum=2, global_batch=8, clip=0.0, nan_at=None, nan_rank=None,
                  rank=0, world=1, inf_at=None, record=None, fused=False):
    """Train :func:`engine_model` (cross-entropy); returns per-step global-mean losses, applied flags and the
    final full weights. ``inf_at``: optimizer step whose gradients get one +inf element (:func:`inject_inf`);
    ``record``: a dict that receives the GradScaler scale after every optimizer step ("scales"); with an
    "optimizer" key, the engine's ``full_optimizer_state_dict()`` at the end; with "roundtrip": DIR, the scale of
    a fresh engine loaded from ``eng.state.save(DIR)`` ("loaded_scale")."""
    import torch.distributed as dist

    from usp_scale.config import OptimConfig
    from usp_scale.engine import build_engine
    from usp_scale.training.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    model = engine_model()
    # eps 1e-4: AdamW's per-element normalisation would turn the reduction-order noise on parameters whose true
    # gradient is ~0 (e.g. the key bias, softmax-invariant) into full-size steps; a large eps keeps updates
    # proportional to the gradient, which also makes a wrong gradient scale (e.g. sum vs mean) visible.
    # fused=True: torch's fused AdamW, which skips non-finite steps on the device (no host sync).
    ocfg = OptimConfig(lr=1e-2, weight_decay=0.05, eps=1e-4, fused=fused)
    per = global_batch // world
    eng = build_engine(engine_cfg, model, lambda m: build_optimizer(ocfg, param_groups(m, 0.05), torch.device("cpu")),
                       accum_iter=accum, clip_grad=clip, micro_batch=per)
    x, y = engine_data(steps, accum, global_batch)
    losses, applied, acc = [], [], 0.0
    for i in range(steps * accum):
        xb, yb = x[i, rank * per:(rank + 1) * per], y[i, rank * per:(rank + 1) * per]
        with eng.sync_context(), eng.autocast():
            loss = torch.nn.functional.cross_entropy(eng(xb).float(), yb)
        if nan_at is not None and i // accum == nan_at and (nan_rank is None or nan_rank == rank):
            loss = loss * float("nan")
        eng.backward(loss)
        if inf_at is not None and i // accum == inf_at and i % accum == accum - 1:
            inject_inf(eng, rank, world)
        acc += float(loss.detach()) / accum
        res = eng.step()
        if res is None:
            continue
        if record is not None:
            record.setdefault("scales", []).append(eng.scaler.get_scale() if eng.scaler is not None else None)
        t = torch.tensor([acc], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(t)
        losses.append(float(t) / world)
        applied.append(res.applied)
        acc = 0.0
    if record is not None and "optimizer" in record:  # asked for: the engine's full optimizer state (collective)
        record["optimizer"] = eng.weights.full_optimizer_state_dict()
    if record is not None and "roundtrip" in record:  # save, load into a fresh engine: the restored scale
        eng.state.save(record["roundtrip"])
        torch.manual_seed(0)
        eng2 = build_engine(engine_cfg, engine_model(),
                            lambda m: build_optimizer(ocfg, param_groups(m, 0.05), torch.device("cpu")),
                            accum_iter=accum, clip_grad=clip, micro_batch=per)
        eng2.state.load(record["roundtrip"])
        record["loaded_scale"] = eng2.scaler.get_scale() if eng2.scaler is not None else None
    sd = eng.weights.full_model_state_dict()
    return losses, applied, {k: v.tolist() for k, v in sd.items()}


def engine_cfg(name: str, **kw):
    from usp_scale.config import EngineConfig

    c = EngineConfig(name=name, precision="fp32")
    for k, v in kw.items():
        setattr(c, k, v)
    return c


EQUIV_CASES = {
    "ddp": dict(name="ddp"),
    "ddp_bf16": dict(name="ddp", reduce_dtype="bf16"),
    "fsdp2": dict(name="fsdp2"),
    "fsdp2_noreshard": dict(name="fsdp2", reshard_after_forward=False),
    "ds1": dict(name="deepspeed", zero_stage=1),
    "ds2": dict(name="deepspeed", zero_stage=2),
    "ds3": dict(name="deepspeed", zero_stage=3),
    "ds2_bf16": dict(name="deepspeed", zero_stage=2, precision="bf16"),
    "fsdp2_bf16": dict(name="fsdp2", precision="bf16"),
    # fused AdamW: non-finite steps skipped on the device through found_inf (FSDP2: over DTensor shards)
    "ddp_fused": dict(name="ddp", fused=True),
    "fsdp2_fused": dict(name="fsdp2", fused=True),
    # FP8 matmuls (torchao) in the block linears, compared with a local FP8 run
    "ddp_fp8": dict(name="ddp", fp8="tensorwise"),
    "fsdp2_fp8": dict(name="fsdp2", fp8="tensorwise"),
    # HSDP: shards within pairs of ranks, replicas across pairs (run with 4 processes)
    "hsdp": dict(name="fsdp2", fsdp_shard_size=2),
    "hsdp_fused": dict(name="fsdp2", fsdp_shard_size=2, fused=True),
}


def worker_equiv(out: str, cases: list) -> None:
    import torch.distributed as dist

    info = init_group()
    results = {}
    for case in cases:
        kw = dict(EQUIV_CASES[case])
        fused = kw.pop("fused", False)
        cfg = engine_cfg(kw.pop("name"), **kw)
        losses, applied, sd = engine_losses(cfg, clip=1.0, rank=info.rank, world=info.world_size, fused=fused)
        nl, na, nsd = engine_losses(cfg, steps=3, nan_at=1, nan_rank=1, rank=info.rank, world=info.world_size,
                                    fused=fused)
        results[case] = {"losses": losses, "applied": applied, "state": sd,
                         "nan_losses": nl, "nan_applied": na, "nan_state": nsd}
    flags = [None] * info.world_size
    dist.all_gather_object(flags, {c: results[c]["nan_applied"] for c in cases})
    results["_nan_applied_per_rank"] = flags
    finish(out, "equiv.json", results, info.rank)


FP16_CASES = {"ddp_fp16": dict(name="ddp"), "fsdp2_fp16": dict(name="fsdp2"),
              "fsdp2_fp16_noreshard": dict(name="fsdp2", reshard_after_forward=False),
              # torch's fused AdamW: GradScaler.step hands it found_inf (and no grad_scale after unscale_)
              "ddp_fp16_fused": dict(name="ddp", fused=True), "fsdp2_fp16_fused": dict(name="fsdp2", fused=True)}


def worker_fp16(out: str, cases: list) -> None:
    """engine.precision=fp16 (CPU autocast + GradScaler): a clean run, and a run with one +inf gradient element at
    step 1 (in one rank's shard under fsdp2); per-step losses, applied flags, scales of every rank, final weights."""
    import torch.distributed as dist

    info = init_group()
    if os.environ.get("USP_TEST_NO_DTENSOR_FOUND_INF"):  # test-power check: rank-local found_inf under FSDP2
        from torch.distributed.tensor import DTensor

        handlers = DTensor._op_dispatcher._custom_op_handlers
        handlers.pop(torch.ops.aten._amp_foreach_non_finite_check_and_unscale_.default)
    results = {}
    for case in cases:
        kw = dict(FP16_CASES[case])
        fused = kw.pop("fused", False)
        cfg = engine_cfg(kw.pop("name"), precision="fp16", **kw)
        rec, irec = {}, {"roundtrip": os.path.join(out, f"ckpt_{case}")}
        losses, applied, sd = engine_losses(cfg, clip=1.0, rank=info.rank, world=info.world_size, record=rec,
                                            fused=fused)
        il, ia, isd = engine_losses(cfg, clip=1.0, inf_at=1, rank=info.rank, world=info.world_size, record=irec,
                                    fused=fused)
        scales = [None] * info.world_size
        dist.all_gather_object(scales, {"scales": rec["scales"], "inf_scales": irec["scales"], "inf_applied": ia,
                                        "loaded_scale": irec["loaded_scale"]})
        results[case] = {"losses": losses, "applied": applied, "state": sd, "inf_losses": il, "inf_applied": ia,
                         "inf_state": isd, "per_rank": scales}
    finish(out, "fp16.json", results, info.rank)


OPTSTATE_CASES = {"ddp": dict(name="ddp"), "fsdp2": dict(name="fsdp2"), "ds1": dict(name="deepspeed", zero_stage=1),
                  "ds2": dict(name="deepspeed", zero_stage=2), "ds3": dict(name="deepspeed", zero_stage=3),
                  "ds2_bf16": dict(name="deepspeed", zero_stage=2, precision="bf16")}


def worker_optstate(out: str, cases: list) -> None:
    """4 optimizer steps (accumulation 2, clipping) per engine; rank 0 saves full_optimizer_state_dict() as
    DIR/opt_<case>.pt, and what the other ranks returned as DIR/opt_<case>_others.json."""
    import torch.distributed as dist

    info = init_group()
    for case in cases:
        kw = dict(OPTSTATE_CASES[case])
        rec = {"optimizer": None}
        engine_losses(engine_cfg(kw.pop("name"), **kw), clip=1.0, rank=info.rank, world=info.world_size, record=rec)
        others = [None] * info.world_size
        dist.all_gather_object(others, None if rec["optimizer"] is None else type(rec["optimizer"]).__name__)
        if info.rank == 0:
            torch.save(rec["optimizer"], os.path.join(out, f"opt_{case}.pt"))
            with open(os.path.join(out, f"opt_{case}_others.json"), "w") as f:
                json.dump(others, f)
    dist.barrier()
    print(OK, info.rank, flush=True)


# ---------------------------------------------------------------------------------------- trainer runs

def trainer_cfg(engine: str, out: str, **over):
    from usp_scale.config import load_config

    ov = [f"output_dir={out}", f"engine.name={engine}", "engine.precision=fp32",
          "data.synthetic_samples=48", "data.batch_size=4", "schedule.accum_iter=2", "schedule.max_steps=10",
          "schedule.warmup_steps=3", "ema.decay=0.9", "checkpoint.every_steps=0", "optim.fused=false",
          "optim.clip_grad=1.0"]
    if engine == "deepspeed":
        ov.append("engine.zero_stage=" + str(over.pop("zero_stage", 2)))
    ov += [f"{k}={v}" for k, v in over.items()]
    return load_config(os.path.join(REPO, "configs", "debug", "synthetic_pretrain.yaml"), ov)


def run_resume_pair(engine: str, base: str, **over) -> dict:
    """2N steps in one go vs N steps + resume + N steps; returns losses and final exports of both."""
    from usp_scale.training import run

    def losses(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return [json.loads(line)["loss"] for line in f if '"kind": "train"' in line]

    full, split = os.path.join(base, "full"), os.path.join(base, "split")
    run(trainer_cfg(engine, full, **over))
    run(trainer_cfg(engine, split, stop_after_steps=5, **over))
    run(trainer_cfg(engine, split, **over))
    from safetensors.torch import load_file

    out = {"full": losses(full), "split": losses(split)}
    for name in ("model", "ema"):
        a = load_file(os.path.join(full, "export", f"{name}.safetensors"))
        b = load_file(os.path.join(split, "export", f"{name}.safetensors"))
        out[f"{name}_equal"] = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    return out


def worker_resume(out: str, engines: list, model: str = "", sets: tuple = ()) -> None:
    info = init_group()
    results = {}
    for spec in engines:
        name, _, stage = spec.partition(":")
        over = {"zero_stage": int(stage)} if stage else {}
        if model:
            over["model.name"] = model
        over.update(kv.split("=", 1) for kv in sets)
        results[spec] = run_resume_pair(name, os.path.join(out, spec.replace(":", "")), **over)
    finish(out, "resume.json", results, info.rank)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["equiv", "resume", "fp16", "optstate"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", nargs="*", default=list(EQUIV_CASES))
    ap.add_argument("--model", default="", help="model for the resume runs (default: the debug recipe's)")
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides for the resume runs")
    ap.add_argument("--local_rank", type=int, default=-1)
    a = ap.parse_args()
    sys.path.insert(0, REPO)
    if a.mode == "equiv":
        worker_equiv(a.out, a.cases)
    elif a.mode == "fp16":
        worker_fp16(a.out, a.cases)
    elif a.mode == "optstate":
        worker_optstate(a.out, a.cases)
    else:
        worker_resume(a.out, a.cases, a.model, tuple(a.set))
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed on CPU occasionally aborts in its exit handlers after success
