"""The kernel micro-benchmark harness runs end to end (CPU smoke mode, interpreter, tiny batch) and
refuses, with a clear message, to 'measure' anything on a machine without a GPU."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "kernels"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="smoke mode needs the interpreter")
def test_bench_harness_cpu_smoke(tmp_path):
    out = tmp_path / "bench.csv"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(BENCH / "bench_unshuffle.py"), "--device", "cpu", "--batch", "1",
                        "--quick", "--reps", "1", "--modes", "forward,backward,full", "--providers", "torch-eager,triton",
                        "--tiny", "--csv", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 and {r["provider"] for r in rows} == {"torch-eager", "triton"}
    assert all(r["card"].startswith("CPU") and r["torch"] and r["triton"] and r["date"] for r in rows)
    # device-time columns: on the CPU the profiler path stands in for CUDA-graph replay
    assert all(r["device_method"] == "profiler-cpu" and float(r["device_ms"]) > 0 for r in rows)
    assert all(float(r["kernels_per_call"]) >= 1 and r["device_speedup_vs_eager"] for r in rows)
    # a CSV with other columns is refused before anything is measured
    old = tmp_path / "old.csv"
    old.write_text("date,card,ms\n")
    r = subprocess.run([sys.executable, str(BENCH / "bench_unshuffle.py"), "--device", "cpu", "--batch", "1",
                        "--quick", "--reps", "1", "--csv", str(old)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "has other columns" in r.stderr and old.read_text() == "date,card,ms\n"


def test_bench_refuses_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--csv", str(tmp_path / "x.csv")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no CUDA GPU found" in r.stderr
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts launches through the interpreter")
def test_launch_counts_of_the_fused_ops():
    """The launch budget per call (benchmarks/kernels/count_launches.py): the fused patch embed is one
    kernel forward and one GEMM (+ autograd's layout copy of dW) backward in the MAE training case; the
    loss is two kernels forward and one backward; eager calls make no custom-op round-trip."""
    sys.path.insert(0, str(BENCH))
    import count_launches as cl

    from usp_scale.layers import fused

    cases = cl._cases()
    expect = {  # case: (forward total, backward total)
        "embed_visible_patches[train]": (1, 2),
        "embed_visible_patches[train-autocast]": (1, 2),
        "masked_latent_loss[image]": (2, 1),
        "layernorm_modulate": (1, 2),
        "unshuffle": (1, 3),
    }
    for name, (fwd, bwd) in expect.items():
        op, make = cases[name]
        for mode, want in (("forward", fwd), ("backward", bwd)):
            c = cl.count(cl._op_fn(fused, op, "triton"), make(), mode)
            total = sum(v for k, v in c.items() if not k.startswith("custom_op."))
            assert total == want and not any(k.startswith("custom_op.") for k in c), (name, mode, dict(c))


def test_every_kernel_bench_has_tiny_cpu_shapes():
    """The CPU recipe of benchmarks/kernels/README.md (--tiny): every op's cases are small enough for the
    interpreter (at most 64 x 16 x 2 elements per tensor row block), the goal shapes otherwise."""
    sys.path.insert(0, str(BENCH))
    import functools
    import bench_adaln, bench_masked_loss, bench_patch_embed, bench_unshuffle  # noqa: E401
    from _bench import parse_args

    assert parse_args("x", ["--tiny"]).tiny and not parse_args("x", []).tiny
    for fn in (functools.partial(bench_adaln._cases, "layernorm_modulate"),
               functools.partial(bench_adaln._cases, "gated_residual"),
               bench_masked_loss._cases, bench_patch_embed._cases, bench_unshuffle._cases):
        tiny, full = fn(2, "cpu", True), fn(2, "cpu", False)
        assert len(tiny) == len(full)
        assert all("1152" not in c["name"] and "x28" not in c["name"] and "x256" not in c["name"] for c in tiny)
        assert any("1152" in c["name"] or "x28" in c["name"] for c in full)
