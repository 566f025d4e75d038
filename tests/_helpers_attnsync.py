"""Worker for tests/test_attention_sync.py: one gloo rank choosing attention backends (fake CUDA timings)."""
import importlib
import json
import logging
import math
import os

import torch
import torch.distributed as dist


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    A = importlib.import_module("usp_scale.layers.attention")
    records = []

    class Keep(logging.Handler):
        def emit(self, r):
            records.append((r.levelno, r.getMessage()))
    A.log.addHandler(Keep())
    A.log.setLevel(logging.DEBUG)
    res = {}
    cuda = torch.device("cuda", 0)   # never touched: probes and timings are replaced below
    # Alone, rank 0 would pick cudnn (1.0 < 2.0) and rank 1 flash (1.5 < 3.0); the slowest-rank times are
    # cudnn 3.0, flash 2.5, efficient 4.0, so both must pick flash.
    table = {0: {"cudnn": 1.0, "flash": 2.5, "efficient": 4.0}, 1: {"cudnn": 3.0, "flash": 1.5, "efficient": 2.0}}
    A._probe = lambda name, key, device: None
    A._time_ms = lambda name, key, device: table[rank][name]
    A.configure_attention("sdpa", cuda)
    A._STATE["device"] = cuda                         # a CPU-only machine would keep an index-less "cuda"
    torch.manual_seed(7)
    before = torch.get_rng_state()
    res["sdpa"] = A._choose((4, 16, 256, 72, torch.bfloat16))[0]
    res["rng_same"] = bool(torch.equal(before, torch.get_rng_state()))
    # A candidate that runs on rank 1 only (efficient: fastest there) is excluded everywhere.
    A._probe = lambda name, key, device: "no kernel" if (rank, name) == (0, "efficient") else None
    table[1]["efficient"] = 0.1
    res["excluded"] = A._choose((4, 16, 128, 64, torch.bfloat16))[0]
    # auto: flash2 works on rank 0 only -> both skip it and time SDPA.
    A._auto_order = lambda device: ("flash2", "sdpa") if rank == 0 else ("sdpa",)
    A.configure_attention("auto", cuda, shapes=[(2, 8, 64, 32, torch.bfloat16)])   # pre-selection
    res["auto"] = A.current_choices()[(8, 64, 32, torch.bfloat16)]
    # Without sync each rank keeps its own timing (the old behaviour).
    A._probe = lambda name, key, device: None
    A.configure_attention("sdpa", cuda, sync=False)
    A._STATE["device"] = cuda
    res["unsynced"] = A._choose((4, 16, 256, 72, torch.bfloat16))[0]
    # Ranks at different shapes at the same time: a clear error on every rank, not a silent mismatch.
    A.configure_attention("sdpa", cuda)
    A._STATE["device"] = cuda
    try:
        A._choose((4, 16, 256 + rank, 72, torch.bfloat16))
        res["mismatch"] = "no error"
    except RuntimeError as e:
        res["mismatch"] = str(e)
    # A rank-local forward (e.g. a sample grid on rank 0) inside attention_sync(False): no collective, no hang.
    if rank == 0:
        with A.attention_sync(False):
            res["local"] = A._choose((4, 16, 512, 72, torch.bfloat16))[0]
    res["sync_after"] = A._STATE["sync"]
    res["info_logs"] = [m for lv, m in records if lv >= logging.INFO and "->" in m]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
        f.write("OK")
    # gloo on CPU sometimes aborts in its teardown ("terminate called without an active exception") after
    # the work is done; the success markers are what the test checks, so skip the teardown.
    os._exit(0)
