"""Two-process worker for the in-training FID hook under the ddp / fsdp2 / deepspeed engines.

torchrun --nproc_per_node 2 tests/_helpers_fidhook.py --out DIR --data SYNTHETIC [--engines ddp fsdp2 deepspeed:3]
For each engine: a tiny DiT run of 4 steps with FID every 2 steps (EMA on), the same run split 2 + resume + 2,
and an independent FID of the exported EMA computed on both ranks. Rank 0 writes DIR/fidhook.json;
every rank prints FIDHOOK_OK when done.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OK = "FIDHOOK_OK"


def cfg(engine: str, out: str, data: str, *extra):
    from usp_scale.config import load_config

    name, _, stage = engine.partition(":")
    ov = [f"output_dir={out}", f"engine.name={name}", "engine.precision=fp32",
          "task=dit", "model.name=DiT-tiny/2-VAE-simple", "model.num_classes=4", f"data.root={data}",
          "data.num_classes=4", "data.batch_size=4", "checkpoint.init_from=", "checkpoint.every_steps=0",
          "schedule.max_steps=4", "log_every=1", "progress=false", "tensorboard=false", "plot=false",
          "optim.fused=false", "eval.fid_every=2", "eval.fid_samples=10", f"eval.fid_reference={data}/val",
          "eval.feature_extractor=usp-tiny", "eval.sampler=ddim", "eval.steps=3", "eval.batch_size=8", *extra]
    if stage:
        ov.append(f"engine.zero_stage={stage}")
    return load_config(os.path.join(REPO, "configs", "debug", "tiny_dit.yaml"), ov)


def records(out: str) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--engines", nargs="*", default=["ddp", "fsdp2", "deepspeed:3"])
    ap.add_argument("--local_rank", type=int, default=-1)
    a = ap.parse_args()
    sys.path.insert(0, REPO)
    import torch.distributed as dist
    from safetensors.torch import load_file

    from usp_scale.eval import evaluate_fid
    from usp_scale.training import run
    from usp_scale.training.tasks import build_task
    from usp_scale.vae import FrozenVAE

    import _helpers_train as H

    info = H.init_group()
    results = {}
    for engine in a.engines:
        base = os.path.join(a.out, engine.replace(":", ""))
        full, split = os.path.join(base, "full"), os.path.join(base, "split")
        run(cfg(engine, full, a.data))
        run(cfg(engine, split, a.data, "stop_after_steps=2"))
        run(cfg(engine, split, a.data))
        c = cfg(engine, full, a.data)
        task = build_task(c)
        model = task.build_model()
        model.load_state_dict(load_file(os.path.join(full, "export", "ema.safetensors")))
        ref = evaluate_fid(model, task.diffusion, FrozenVAE.from_config(c.vae), c.eval, c.eval.fid_samples)
        if info.rank == 0:
            rf, rs = records(full), records(split)

            def ev(recs):
                return [(r["step"], r["fid"], r["num_samples"], r["weights"]) for r in recs if r["kind"] == "eval"]

            results[engine] = {
                "full_losses": [r["loss"] for r in rf if r["kind"] == "train"],
                "split_losses": [r["loss"] for r in rs if r["kind"] == "train"],
                "full_eval": ev(rf),
                "split_eval": ev(rs),
                "grids": sorted(os.listdir(os.path.join(full, "samples"))),
                "independent_fid": ref["fid"],
            }
    if info.rank == 0:
        with open(os.path.join(a.out, "fidhook.json"), "w") as f:
            json.dump(results, f)
    dist.barrier()
    print(OK, info.rank, flush=True)


if __name__ == "__main__":
    main()
