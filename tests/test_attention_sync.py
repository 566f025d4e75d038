"""Attention backend choice agreed over ranks: 2 gloo processes whose own timings would pick different SDPA
backends must pick the same one (slowest-rank time argmin; a candidate failing on any rank is excluded)."""
import json
import os

import torch.multiprocessing as mp

from _helpers_attnsync import worker
from _helpers_data import free_port


def test_two_ranks_agree_on_backend(tmp_path):
    try:
        mp.start_processes(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    except mp.ProcessExitedException:  # judged by the success markers below (written after all checks ran)
        pass
    assert all((tmp_path / f"ok{r}").exists() for r in range(2)), "a rank did not finish its checks"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["sdpa"] == r1["sdpa"] == "sdpa_flash"          # alone: cudnn on rank 0, flash on rank 1
    assert r0["excluded"] == r1["excluded"] == "sdpa_flash"  # efficient fails on rank 0 -> never chosen
    assert r0["auto"] == r1["auto"] == "sdpa_flash"          # flash2 only on rank 0 -> skipped on both
    assert (r0["unsynced"], r1["unsynced"]) == ("sdpa_cudnn", "sdpa_efficient")   # sync=False: per rank
    assert r0["local"] == "sdpa_cudnn" and "local" not in r1                 # rank 0 alone, its own timing
    for r in (r0, r1):
        assert r["sync_after"] is True
        assert "not in step" in r["mismatch"]
        assert r["rng_same"]
    # agreed choices are logged by rank 0 only (rank 1 logs just its unsynced choice)
    assert len(r0["info_logs"]) == 5 and "agreed over 2 ranks" in r0["info_logs"][0]
    assert len(r1["info_logs"]) == 1 and "sdpa_efficient" in r1["info_logs"][0]
    assert "efficient: no kernel" in r0["info_logs"][1]                # why rank 0 excluded it
