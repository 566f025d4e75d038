"""Shared harness for the kernel micro-benchmarks (GPU only).

Each bench_<op>.py lists cases built with the tests' input factories (tests/_helpers_kernels.py) and
the byte traffic each mode must move at least; this module times providers (torch-eager reference,
torch.compile of the reference, triton) in forward / backward / full mode with CUDA events (median,
inputs rotated so the L2 cache does not flatter), reports GB/s as a fraction of the measured HBM
bandwidth, and appends rows to a CSV with card, versions and date.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))                     # the tests' input factories

DEFAULT_CSV = ROOT / "benchmarks" / "kernels" / "results.csv"
PROVIDERS = ("torch-eager", "torch-compile", "triton")
MODES = ("forward", "backward", "full")


def require_gpu(device: str = "cuda") -> None:
    """Exit with a clear message when no CUDA GPU (or the Triton interpreter) would be measured.
    ``device="cpu"`` is the harness smoke test (interpreter, meaningless timings)."""
    import torch

    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            sys.exit("benchmarks/kernels --device cpu is a smoke test of the harness; it needs TRITON_INTERPRET=1")
        print("# CPU smoke run through the Triton interpreter: the timings below mean nothing", flush=True)
        return
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("benchmarks/kernels: TRITON_INTERPRET=1 is set; unset it (interpreter timings mean nothing)")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels: no CUDA GPU found; these micro-benchmarks only run on a GPU "
                 "(nothing was measured). Correctness on CPU: pytest tests/test_kernels_*.py")


def env_info(device: str = "cuda") -> Dict[str, str]:
    import platform

    import torch
    import triton

    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "card": torch.cuda.get_device_name() if device == "cuda" else f"CPU {platform.machine()} (interpreter)", "torch": torch.__version__, "triton": triton.__version__,
            "cuda": str(torch.version.cuda)}


_BW: Dict[str, float] = {}


class _Timer:
    """Milliseconds of a region: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: str):
        import torch

        self.cuda = device == "cuda"
        if self.cuda:
            self.s, self.e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __enter__(self):
        if self.cuda:
            self.s.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.e.record()
            torch.cuda.synchronize()
            self.ms = self.s.elapsed_time(self.e)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def hbm_bandwidth_gbps(device: str = "cuda") -> float:
    """Measured copy bandwidth (read + write bytes / time) on 2 GiB (64 MiB on CPU), in GB/s."""
    import torch

    if device not in _BW:
        n = (1 << 29) if device == "cuda" else (1 << 24)
        a = torch.empty(n, device=device)
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        times = []
        for _ in range(10):
            with _Timer(device) as t:
                b.copy_(a)
            times.append(t.ms)
        _BW[device] = 2 * a.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9
        del a, b
    return _BW[device]


def _grad_leaves(inputs: Dict) -> List:
    import torch

    return [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def time_provider(fn: Callable, input_sets: List[Dict], mode: str, reps: int, device: str = "cuda") -> float:
    """Median milliseconds of one call in ``mode``, cycling through ``input_sets``."""
    import torch

    outs, grads = [], []
    if mode == "backward":                                  # graphs built once, backward timed alone
        for inp in input_sets:
            out = fn(**inp)
            outs.append(out)
            grads.append(torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out))

    def call(i: int):
        inp = input_sets[i % len(input_sets)]
        if mode == "forward":
            with torch.no_grad():
                fn(**inp)
        elif mode == "full":
            out = fn(**inp)
            out.backward(torch.ones_like(out))
        else:
            k = i % len(input_sets)
            outs[k].backward(grads[k], retain_graph=True)

    for i in range(min(5, reps)):
        call(i)
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for i in range(reps):
        with _Timer(device) as t:
            call(i)
        times.append(t.ms)
    for inp in input_sets:                                  # free accumulated .grad
        for t in _grad_leaves(inp):
            t.grad = None
    return statistics.median(times)


def n_rotations(bytes_per_set: int, l2_bytes: int = 64 << 20, cap: int = 8) -> int:
    """Enough input sets that their total exceeds twice the L2 cache (at least 2, at most ``cap``)."""
    return max(2, min(cap, -(-2 * l2_bytes // max(1, bytes_per_set)) + 1))


def parse_args(op: str, argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=f"Micro-benchmark of the {op} kernel against eager and compiled torch "
                                             "(GPU only).")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="input dtype")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    ap.add_argument("--reps", type=int, default=100, help="timed repetitions per measurement (median reported)")
    ap.add_argument("--quick", action="store_true", help="only the first case, 20 repetitions")
    ap.add_argument("--csv", default=str(DEFAULT_CSV), help="CSV file the rows are appended to")
    ap.add_argument("--batch", type=int, default=256, help="batch size of every case (goal shapes use 256)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cuda (real measurements) or cpu (smoke test of this harness under TRITON_INTERPRET=1)")
    return ap.parse_args(argv)


def run(op: str, cases_fn: Callable, make_fn: Callable[[str], Callable], argv=None) -> List[Dict]:
    """Time every case x mode x provider; print a table and append to the CSV.

    ``cases_fn(batch, device)`` gives dicts with ``name``, ``make(dtype, seed) -> inputs`` and
    ``bytes(mode, dtype) -> int`` (the least traffic the op must move); ``make_fn(provider)`` returns the
    callable taking ``**inputs``.
    """
    args = parse_args(op, argv)
    require_gpu(args.device)
    import torch

    cases = cases_fn(args.batch, args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    modes = [m for m in args.modes.split(",") if m]
    providers = [p for p in args.providers.split(",") if p]
    reps = 20 if args.quick else args.reps
    info = env_info(args.device)
    bw = hbm_bandwidth_gbps(args.device)
    print(f"# {op} | {info['card']} | torch {info['torch']} triton {info['triton']} CUDA {info['cuda']} | "
          f"{info['date']} | measured copy bandwidth {bw:.0f} GB/s")
    rows = []
    for case in (cases[:1] if args.quick else cases):
        first = case["make"](dtype, 0)
        per_set = sum(v.numel() * v.element_size() for v in first.values() if isinstance(v, torch.Tensor))
        sets = [first] + [case["make"](dtype, s) for s in range(1, n_rotations(per_set))]
        fns = {p: make_fn(p) for p in providers}
        for mode in modes:
            base = None
            for p in providers:
                ms = time_provider(fns[p], sets, mode, reps, args.device)
                gbps = case["bytes"](mode, dtype) / (ms * 1e-3) / 1e9
                base = ms if p == "torch-eager" else base
                row = dict(info, op=op, case=case["name"], dtype=args.dtype, mode=mode, provider=p,
                           ms=f"{ms:.4f}", gbps=f"{gbps:.1f}", frac_bw=f"{gbps / bw:.3f}", hbm_gbps=f"{bw:.0f}",
                           speedup_vs_eager="" if base is None else f"{base / ms:.2f}")
                rows.append(row)
                print(f"{case['name']:28s} {mode:8s} {p:14s} {ms:8.4f} ms {gbps:8.1f} GB/s "
                      f"{100 * gbps / bw:5.1f}% bw  x{row['speedup_vs_eager'] or '-'} vs eager")
        del sets
        if args.device == "cuda":
            torch.cuda.empty_cache()
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")
    return rows


def compiled(fn: Callable) -> Callable:
    import torch

    return torch.compile(fn, dynamic=False)
