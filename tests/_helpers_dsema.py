"""Worker for the DeepSpeed ZeRO-1/2 bf16 EMA tests (fp32 masters, not bf16 module weights).

Run under torchrun:  python tests/_helpers_dsema.py {ema,resume,init} --out DIR
Rank 0 writes DIR/<mode>.json; every rank prints TRAIN_HELPER_OK when done.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _helpers_train as H  # noqa: E402

DECAY = 0.5  # large step so a few updates move the EMA well past bf16 resolution differences
EMA_CASES = {
    "ds1_bf16": dict(zero_stage=1),
    "ds2_bf16": dict(zero_stage=2),
    # ZeRO-1 with fp32 gradient accumulation goes through DeepSpeed's BF16_Optimizer instead of the ZeRO optimizer
    "ds1_bf16_fp32acc": dict(zero_stage=1, user={"data_types": {"grad_accum_dtype": "fp32"}}),
}


def ema_run(case: str, out: str, rank: int, world: int, steps: int = 4, accum: int = 2, global_batch: int = 8) -> dict:
    """Train under DeepSpeed bf16 with the engine's EMA; alongside keep two full references: the EMA of the
    gathered fp32 masters and the EMA of the bf16 module weights. Returns max differences per reference."""
    from deepspeed.utils import safe_get_full_fp32_param

    from usp_scale.config import OptimConfig
    from usp_scale.engine import build_engine
    from usp_scale.training.ema import EMA
    from usp_scale.training.optim import build_optimizer, param_groups

    spec = dict(EMA_CASES[case])
    user = spec.pop("user", None)
    cfg = H.engine_cfg("deepspeed", precision="bf16", **spec)
    if user is not None:
        path = os.path.join(out, f"{case}.json")
        if rank == 0:
            with open(path, "w") as f:
                json.dump(user, f)
        torch.distributed.barrier()
        cfg.deepspeed_config = path
    torch.manual_seed(0)
    model = H.engine_model()
    ocfg = OptimConfig(lr=1e-2, weight_decay=0.05, eps=1e-4, fused=False)
    per = global_batch // world
    eng = build_engine(cfg, model, lambda m: build_optimizer(ocfg, param_groups(m, 0.05), torch.device("cpu")),
                       accum_iter=accum, clip_grad=1.0, micro_batch=per)
    assert eng.weights.layout == "per_rank" and eng.weights.ema_from_masters, (eng.weights.layout, eng.weights.ema_from_masters)
    opt_type = type(eng.model.optimizer).__name__
    named = [(n, p) for n, p in eng.unwrapped.named_parameters() if p.requires_grad]

    def masters():  # full fp32 masters, collective
        return {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in named}

    def bf16_weights():
        return {n: p.detach().float().clone() for n, p in named}

    ema = EMA(eng.weights.ema_sources(), DECAY)
    ref_fp32, ref_bf16 = masters(), bf16_weights()
    x, y = H.engine_data(steps, accum, global_batch)
    applied = []
    for i in range(steps * accum):
        xb, yb = x[i, rank * per:(rank + 1) * per], y[i, rank * per:(rank + 1) * per]
        with eng.sync_context(), eng.autocast():
            loss = torch.nn.functional.cross_entropy(eng(xb).float(), yb)
        eng.backward(loss)
        res = eng.step()
        if res is None:
            continue
        applied.append(res.applied)
        ema.update(eng.weights.ema_sources())
        for ref, cur in ((ref_fp32, masters()), (ref_bf16, bf16_weights())):
            for n in ref:  # the same arithmetic as EMA.update, on full tensors
                ref[n].mul_(DECAY).add_(cur[n], alpha=1.0 - DECAY)
    got = eng.weights.gather_ema(ema.state_dict())
    local = sum(t.numel() for t in ema.state_dict().values())
    r = {"applied": applied, "optimizer": opt_type, "local_numel": local,
         "total_numel": sum(p.numel() for _, p in named), "keys_equal": sorted(got) == sorted(ref_fp32),
         "dtypes": sorted({str(v.dtype) for v in got.values()}),
         "max_abs_vs_fp32": max((got[n] - ref_fp32[n]).abs().max().item() for n in ref_fp32),
         "max_abs_vs_bf16": max((got[n] - ref_bf16[n]).abs().max().item() for n in ref_fp32),
         "bf16_ref_vs_fp32_ref": max((ref_bf16[n] - ref_fp32[n]).abs().max().item() for n in ref_fp32),
         # fraction of EMA elements that are not representable in bf16 (an EMA of bf16 weights with decay
         # 0.5 after a few steps keeps only a few extra bits; an fp32-master EMA has many)
         "frac_not_bf16": sum(int((got[n] != got[n].bfloat16().float()).sum()) for n in got) /
         sum(got[n].numel() for n in got)}
    return r


INIT_CASES = {"ds1_bf16": 1, "ds2_bf16": 2, "ds3_bf16": 3}


def init_run(case: str, rank: int, world: int) -> dict:
    """Build a bf16 DeepSpeed engine over fp32 weights that bf16 cannot represent: the fp32 masters and the
    EMA must start from those fp32 values, not from their bf16 rounding."""
    from deepspeed.utils import safe_get_full_fp32_param

    from usp_scale.config import OptimConfig
    from usp_scale.engine import build_engine
    from usp_scale.training.ema import EMA
    from usp_scale.training.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    model = H.engine_model()
    orig = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    assert any((v != v.bfloat16().float()).any() for v in orig.values())
    cfg = H.engine_cfg("deepspeed", precision="bf16", zero_stage=INIT_CASES[case])
    ocfg = OptimConfig(lr=1e-2, weight_decay=0.05, eps=1e-4, fused=False)
    eng = build_engine(cfg, model, lambda m: build_optimizer(ocfg, param_groups(m, 0.05), torch.device("cpu")),
                       micro_batch=8 // world)
    named = [(n, p) for n, p in eng.unwrapped.named_parameters() if p.requires_grad]
    masters = {n: safe_get_full_fp32_param(p).detach().float().cpu() for n, p in named}
    ema = eng.weights.gather_ema(EMA(eng.weights.ema_sources(), 0.9).state_dict())
    return {"masters_exact": all(torch.equal(masters[n], orig[n]) for n in masters),
            "ema_exact": sorted(ema) == sorted(orig) and all(torch.equal(ema[n], orig[n]) for n in orig)
            if rank == 0 else True,
            "masters_vs_bf16_exact": all(torch.equal(masters[n], orig[n].bfloat16().float()) for n in masters)}


def worker_init(out: str, cases: list) -> None:

    info = H.init_group()
    results = {c: init_run(c, info.rank, info.world_size) for c in cases}
    H.finish(out, "init.json", results, info.rank)


def worker_ema(out: str, cases: list) -> None:
    import torch.distributed as dist


    info = H.init_group()
    results = {c: ema_run(c, out, info.rank, info.world_size) for c in cases}
    per_rank = [None] * info.world_size
    dist.all_gather_object(per_rank, {c: results[c]["local_numel"] for c in cases})
    results["_local_numel_per_rank"] = per_rank
    H.finish(out, "ema.json", results, info.rank)


def worker_resume(out: str) -> None:
    """ZeRO-2 bf16: 2N steps vs N + resume + N through the trainer (EMA included)."""

    info = H.init_group()
    res = H.run_resume_pair("deepspeed", os.path.join(out, "ds2_bf16"), zero_stage=2, **{"engine.precision": "bf16"})
    H.finish(out, "resume.json", res, info.rank)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["ema", "resume", "init"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", nargs="*", default=list(EMA_CASES))
    ap.add_argument("--local_rank", type=int, default=-1)
    a = ap.parse_args()
    sys.path.insert(0, H.REPO)
    if a.mode == "ema":
        worker_ema(a.out, a.cases)
    elif a.mode == "init":
        worker_init(a.out, [c for c in a.cases if c in INIT_CASES] or list(INIT_CASES))
    else:
        worker_resume(a.out)
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed on CPU occasionally aborts in its exit handlers after success
