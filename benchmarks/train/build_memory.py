#!/usr/bin/env python
"""Peak host memory (RSS) of building a model under the FSDP2 engine, per rank, as the trainer builds it.

    torchrun --nproc_per_node 2 benchmarks/train/build_memory.py --mode meta  --out meta.json
    torchrun --nproc_per_node 2 benchmarks/train/build_memory.py --mode whole --out whole.json

``--mode whole``: every rank builds and initialises the whole model on the CPU (seeded), then the engine shards it
(the trainer before issue 19). ``--mode meta``: rank 0 builds the whole model once for its state dict, every rank
builds it on the meta device, the engine shards it, allocates only the shards and fills them from rank 0's state
(the trainer now: ``usp_scale.engine.INITIALISE_AFTER_SHARDING``). Both give the same weights (checked here:
``--check`` compares a few full parameters gathered from the sharded model with the whole build).

Memory: ``ru_maxrss`` (the process's peak resident set, which also counts the imports), the resident set after
the imports and the process group (the baseline), and their difference (what building the model and the engine
cost), per rank. The script runs against an older tree too (``PYTHONPATH=<old checkout>``, mode whole), which is
how the "before" of benchmarks/reports/fsdp2_build_memory_cpu_2026-12-06.md was measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import usp_scale  # noqa: E402
from usp_scale.config import EngineConfig  # noqa: E402
from usp_scale.engine import build_engine  # noqa: E402
from usp_scale.models import create_model  # noqa: E402

try:  # this tree: the runtime creates the group (usp_scale.runtime)
    from usp_scale.runtime import detect, init_process_group

    def start_group():
        init_process_group(detect(), "gloo", 30, single_process_group=True)
except ImportError:  # an older tree (issue 19's "before"): its build_engine created the group itself
    def start_group():
        from usp_scale.engine.dist import init_distributed
        init_distributed("gloo", 30, single_process_group=True)


def rss_mib() -> float:
    """The resident set now, MiB (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-XL/2", help="registry name (default DiT-XL/2, 675M parameters)")
    ap.add_argument("--mode", choices=["whole", "meta"], required=True, help="how the model is built (see above)")
    ap.add_argument("--check", action="store_true", help="also compare gathered parameters with a whole build")
    ap.add_argument("--out", default="", help="rank 0 writes the per-rank numbers here as JSON")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    start_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()
    base = rss_mib()
    t0 = time.perf_counter()
    factory = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=False)  # noqa: E731
    cfg = EngineConfig(name="fsdp2", precision="fp32")
    if a.mode == "whole":
        torch.manual_seed(0)
        model = create_model(a.model)
        eng = build_engine(cfg, model, factory)
    else:
        torch.manual_seed(0)
        init_state = create_model(a.model).state_dict() if rank == 0 else None
        model = create_model(a.model, device="meta")
        eng = build_engine(cfg, model, factory, init_state=init_state)
        del init_state
    dist.barrier()
    seconds = time.perf_counter() - t0
    row = {"rank": rank, "baseline_mib": round(base, 1), "peak_mib": round(peak_mib(), 1),
           "build_mib": round(peak_mib() - base, 1), "after_build_rss_mib": round(rss_mib(), 1),
           "seconds": round(seconds, 1)}
    if a.check:  # after the measurement (it builds a second whole model on rank 0)
        names = ["pos_embed", "blocks.0.attn.qkv.weight", "blocks.27.mlp.fc2.weight", "final_layer.linear.weight"]
        full = eng.weights.full_model_state_dict() if hasattr(eng, "weights") else eng.full_model_state_dict()
        if rank == 0:
            torch.manual_seed(0)
            ref = create_model(a.model).state_dict()
            row["weights_equal_whole_build"] = all(torch.equal(full[n], ref[n]) for n in names if n in ref)
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        doc = {"model": a.model, "mode": a.mode, "world": world, "ranks": rows,
               "sum_peak_mib": round(sum(r["peak_mib"] for r in rows), 1),
               "sum_build_mib": round(sum(r["build_mib"] for r in rows), 1),
               "usp_scale": os.path.dirname(usp_scale.__file__), "torch": torch.__version__,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average": os.getloadavg()}
        print(json.dumps(doc, indent=1), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(doc, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
