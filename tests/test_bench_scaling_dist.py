"""The scaling model's collectives per step == what the project's engines send in 2- and 4-rank gloo runs of the tiny
models (MAE-tiny, DiT-tiny/2), counted through torch.profiler (benchmarks/scaling/measure_comm.py)."""
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
import _helpers_train as H  # noqa: E402
from scaling import measure_comm as MC  # noqa: E402

OK = "MEASURE_COMM_OK"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_model_bytes_equal_measured_engine_traffic(tmp_path, world):
    p = H.torchrun(["benchmarks/scaling/measure_comm.py", "--out", str(tmp_path)], nproc=world, timeout=600)
    assert p.stdout.count(OK) == world, f"rc={p.returncode}\n{(p.stdout + p.stderr)[-6000:]}"
    path = tmp_path / f"comm_w{world}.json"
    rows = MC.compare_files([str(path)])
    cases = {c for c in MC.CASES if world >= 4 or c not in MC.WORLD4_ONLY}
    assert {(r["case"], r["model"]) for r in rows} == {(c, m) for c in cases for m in ("MAE-tiny", "DiT-tiny/2")}
    bad = [(r["case"], r["model"], r["only_model"][:5], r["only_measured"][:5], r["rel_diff"]) for r in rows
           if not r["ok"]]
    assert not bad, bad
    for r in rows:
        assert r["ranks_agree"] and r["measured_bytes"] > 0 and r["rel_diff"] <= MC.TOLERANCE
    # the check has power: a wrong reduction dtype, a reduce-scatter instead of DeepSpeed's all-reduce, FSDP2 without
    # the backward re-gather, or ZeRO-3 keeping parameters it re-gathers, are all caught on the same measurements
    res = json.load(open(path))["cases"]
    nets = {}
    wrong = {"ddp_fp32": dict(kind="ddp", reduce_dtype="bf16"),
             "zero1": dict(kind="zero3", param_dtype="fp32", reduce_dtype="fp32", ds_persistence=10 ** 12),
             "fsdp2": dict(kind="fsdp2", param_dtype="fp32", reshard_after_forward=False),
             "zero3_p0_r0_nopf": dict(kind="zero3", param_dtype="fp32", reduce_dtype="fp32", ds_persistence=0)}
    for case, kw in wrong.items():
        r = MC.compare_case(case, "MAE-tiny", world, res[f"{case}@MAE-tiny"]["ops"], nets, spec_kw=kw)
        assert not r["ok"], (case, kw)
