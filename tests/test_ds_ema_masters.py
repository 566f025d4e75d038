"""DeepSpeed ZeRO-1/2 in bf16: the EMA follows the fp32 master weights (per-rank fragments), not the bf16
module weights; gathered EMA, exact resume and the fp32 export (2 processes, gloo, CPU)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402


def _launch_ok(proc, n=2):
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.stdout.count(H.OK) == n, f"rc={proc.returncode}\n{tail}"


@pytest.mark.slow
def test_zero12_bf16_ema_follows_fp32_masters(tmp_path):
    cases = ["ds1_bf16", "ds2_bf16", "ds1_bf16_fp32acc"]
    p = H.torchrun(["tests/_helpers_dsema.py", "ema", "--out", str(tmp_path), "--cases", *cases], timeout=600)
    _launch_ok(p)
    res = json.load(open(tmp_path / "ema.json"))
    assert res["ds1_bf16"]["optimizer"] == res["ds2_bf16"]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert res["ds1_bf16_fp32acc"]["optimizer"] == "BF16_Optimizer"
    for c in cases:
        r = res[c]
        assert r["applied"] == [True] * 4, c
        assert r["keys_equal"] and r["dtypes"] == ["torch.float32"], c
        # each rank holds only its partition of the EMA, together exactly the parameters
        per_rank = [d[c] for d in res["_local_numel_per_rank"]]
        assert sum(per_rank) == r["total_numel"] and max(per_rank) < r["total_numel"], (c, per_rank)
        # gathered EMA == EMA of the gathered fp32 masters (same arithmetic, so to fp32 round-off at most)
        assert r["max_abs_vs_fp32"] <= 1e-7, (c, r["max_abs_vs_fp32"])
        # ... and not the EMA of the bf16 module weights, which differs by bf16 rounding
        assert r["bf16_ref_vs_fp32_ref"] > 1e-4 and r["max_abs_vs_bf16"] > 1e-4, c
        assert r["frac_not_bf16"] > 0.5, c


@pytest.mark.slow
def test_zero2_bf16_exact_resume_with_fp32_ema_export(tmp_path):
    p = H.torchrun(["tests/_helpers_dsema.py", "resume", "--out", str(tmp_path)], timeout=600)
    _launch_ok(p)
    r = json.load(open(tmp_path / "resume.json"))
    assert len(r["full"]) == 10 and r["full"] == r["split"]
    assert r["model_equal"] and r["ema_equal"]
    import torch
    from safetensors.torch import load_file

    for run in ("full", "split"):
        base = tmp_path / "ds2_bf16" / run
        ema = load_file(str(base / "export" / "ema.safetensors"))
        model = load_file(str(base / "export" / "model.safetensors"))
        assert sorted(ema) == sorted(model)
        assert {v.dtype for v in ema.values()} == {torch.float32}
        # per-rank EMA files in the checkpoint (one per rank), no replicated ema.pt
        ck = sorted((base / "checkpoints").glob("step_*"))[-1] / "engine"
        assert sorted(f.name for f in ck.glob("ema*.pt")) == ["ema_rank00000.pt", "ema_rank00001.pt"]
        # the EMA holds fp32 values (not bf16-representable), i.e. it averaged the fp32 masters
        floats = [v for k, v in ema.items() if v.is_floating_point() and v.numel() > 16]
        n_not_bf16 = sum(int((v != v.bfloat16().float()).sum()) for v in floats)
        assert n_not_bf16 > 0.5 * sum(v.numel() for v in floats)


@pytest.mark.slow
def test_bf16_masters_and_ema_start_from_the_fp32_weights(tmp_path):
    """ZeRO-1/2/3 in bf16: DeepSpeed builds its fp32 masters from the bf16-cast module; the engine restores the
    fp32 values (a transferred fp32 checkpoint keeps its precision), so masters and EMA start exact."""
    p = H.torchrun(["tests/_helpers_dsema.py", "init", "--out", str(tmp_path), "--cases", "ds1_bf16", "ds2_bf16",
                    "ds3_bf16"], timeout=600)
    _launch_ok(p)
    res = json.load(open(tmp_path / "init.json"))
    for case, r in res.items():
        assert r["masters_exact"] and r["ema_exact"] and not r["masters_vs_bf16_exact"], (case, r)
