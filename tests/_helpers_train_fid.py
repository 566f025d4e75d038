"""Multi-process workers for the in-training FID hook's distributed failure and few-sample paths.

torchrun --nproc_per_node 2 tests/_helpers_train_fid.py fail --out DIR --data SYNTHETIC
    A tiny DiT ddp run of 2 steps with FID at step 2, where rank 0 alone raises in one part of the evaluation
    (the FID computation, its sampling, its sample grid); every rank must raise DistributedEvalError quickly
    (the process group times out after 60 s). Then the run is resumed without the fault: the missed FID is
    caught up. Rank 0 writes DIR/fail.json.
torchrun --nproc_per_node 3 tests/_helpers_train_fid.py few --out DIR --data SYNTHETIC
    eval.fid_samples=2 < 3 ranks (rank 2 samples nothing) with eval.precision=bf16 (another dtype than training).
    Rank 0 writes DIR/few.json.
Every rank prints TRAIN_FID_OK at the end.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OK = "TRAIN_FID_OK"


def cfg(out: str, data: str, *extra):
    from usp_scale.config import load_config

    return load_config(os.path.join(REPO, "configs", "debug", "tiny_dit.yaml"), [
        f"output_dir={out}", "engine.name=ddp", "engine.precision=fp32",
        "task=dit", "model.name=DiT-tiny/2-VAE-simple", "model.num_classes=4", f"data.root={data}",
        "data.num_classes=4", "data.batch_size=4", "checkpoint.init_from=", "checkpoint.every_steps=0",
        "schedule.max_steps=2", "log_every=1", "progress=false", "tensorboard=false", "plot=false",
        "optim.fused=false", "eval.fid_every=2", "eval.fid_samples=6", f"eval.fid_reference={data}/val",
        "eval.feature_extractor=usp-tiny", "eval.sampler=ddim", "eval.steps=2", "eval.batch_size=4", *extra])


def _raise(what):
    def f(*a, **k):
        raise ValueError(f"injected failure in {what}")
    return f


def worker_fail(out: str, data: str) -> None:
    import torch.distributed as dist

    import usp_scale.eval.hook as EH
    import usp_scale.eval.metrics as EM  # the hook imports the metrics when it evaluates (no torch-fidelity before)
    from usp_scale.runtime import DistributedEvalError
    from usp_scale.training import run

    rank = dist.get_rank()
    results = {}
    for part, module, name in (("fid", EM, "frechet_distance"), ("sampling", EH, "generate_batches"),
                               ("grid", EH, "save_sample_grid")):
        run_dir = os.path.join(out, part)
        orig = getattr(module, name)
        if rank == 0:
            setattr(module, name, _raise(part))
        t0 = time.perf_counter()
        try:
            run(cfg(run_dir, data))
            got = {"raised": None}
        except DistributedEvalError as e:
            got = {"raised": "DistributedEvalError", "msg": str(e), "cause": repr(e.__cause__)}
        except Exception as e:  # noqa: BLE001 -- reported to the test
            got = {"raised": type(e).__name__, "msg": str(e)[-2000:]}
        got["seconds"] = time.perf_counter() - t0
        setattr(module, name, orig)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, got)
        results[part] = {"per_rank": every}
        if part == "fid":  # the requeued job: resumes at the last step and catches up the failed FID
            run(cfg(run_dir, data))
            if rank == 0:
                with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                    recs = [json.loads(line) for line in f]
                with open(os.path.join(run_dir, "eval_metrics.jsonl")) as f:
                    side = [json.loads(line) for line in f]
                results[part]["resumed_eval_steps"] = [r["step"] for r in recs if r["kind"] == "eval"]
                results[part]["resumed_side_steps"] = [r["step"] for r in side]
    if rank == 0:
        with open(os.path.join(out, "fail.json"), "w") as f:
            json.dump(results, f)


def worker_few(out: str, data: str) -> None:
    import torch.distributed as dist

    from usp_scale.training import run

    run_dir = os.path.join(out, "few")
    t0 = time.perf_counter()
    run(cfg(run_dir, data, "eval.fid_samples=2", "eval.precision=bf16"))
    if dist.get_rank() == 0:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            ev = [json.loads(line) for line in f if '"kind": "eval"' in line]
        with open(os.path.join(out, "few.json"), "w") as f:
            json.dump({"eval": ev, "seconds": time.perf_counter() - t0}, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["fail", "few"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--local_rank", type=int, default=-1)
    a = ap.parse_args()
    sys.path.insert(0, REPO)
    import torch.distributed as dist

    # A short collective timeout: a regression fails in a minute instead of hanging the test.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    (worker_fail if a.mode == "fail" else worker_few)(a.out, a.data)
    dist.barrier()
    print(OK, dist.get_rank(), flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
