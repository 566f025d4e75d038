"""Shared harness for the kernel micro-benchmarks (GPU only).

Each bench_<op>.py lists cases built with the tests' input factories (tests/_helpers_kernels.py) and
the byte traffic each mode must move at least; this module times providers (torch-eager reference,
torch.compile of the reference, triton) in forward / backward / full mode and reports two times per row:

- ``ms`` (wall): median of single calls, each bracketed by CUDA events and a synchronize; it includes the
  host work of the call (Python, dispatch, launch latency) whenever that exceeds the GPU work, which at
  these small shapes it often does. It answers "how long does one isolated call take".
- ``device_ms``: GPU time per call with host overhead removed: the call captured once per input set in a
  CUDA graph and the graphs replayed back to back (``--device-time graph``), or the summed kernel
  durations from torch.profiler (``profiler``; also the fallback when capture fails). It answers "how
  fast are the kernels", and is what the bandwidth fraction should be judged on.

Inputs are rotated over enough copies to exceed 2x L2 so the cache does not flatter; GB/s is reported as
a fraction of the measured copy bandwidth for both times; ``kernels_per_call`` counts the GPU kernels
(and memsets/copies) of one call from a short profile. Rows (card, versions, date) go to a CSV.
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
from typing import Callable, Dict, List, Optional, Tuple

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
    """Median wall milliseconds of one call in ``mode`` (synchronised after each), cycling ``input_sets``."""
    import torch

    call = _make_call(fn, input_sets, mode)
    for i in range(min(5, reps)):
        call(i)
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for i in range(reps):
        with _Timer(device) as t:
            call(i)
        times.append(t.ms)
    _free_grads(input_sets)                                 # free accumulated .grad
    return statistics.median(times)


def _make_call(fn: Callable, input_sets: List[Dict], mode: str):
    """call(i) running ``fn`` on input set i in ``mode``; backward mode builds the graphs first."""
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

    return call


def _free_grads(input_sets: List[Dict]) -> None:
    for inp in input_sets:
        for t in _grad_leaves(inp):
            t.grad = None


def _graph_ms(fn: Callable, input_sets: List[Dict], mode: str, reps: int) -> float:
    """GPU ms per call: one CUDA graph per input set, replayed back to back so the launch queue never
    runs dry. Everything (the eager forward that backward mode needs, the warm-up, the capture) runs on
    one side stream: autograd runs backward ops on their forward's stream, which must be the capturing one."""
    import torch

    n = len(input_sets)
    cap = torch.cuda.Stream()
    cap.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(cap):
        call = _make_call(fn, input_sets, mode)
        for i in range(2 * n):
            call(i)
    torch.cuda.current_stream().wait_stream(cap)
    torch.cuda.synchronize()
    pool = torch.cuda.graph_pool_handle()
    graphs = []
    for k in range(n):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool, stream=cap):
            call(k)
        graphs.append(g)
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(reps):
        graphs[i % n].replay()
    end.record()
    torch.cuda.synchronize()
    del graphs
    return start.elapsed_time(end) / reps


def _profiler_ms(call: Callable, reps: int, device: str) -> Tuple[float, float]:
    """(ms per call, device events per call) from torch.profiler: on CUDA the summed durations of the
    GPU kernels/memsets/copies; on the CPU smoke run the summed top-level CPU ops (meaningless)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for i in range(reps):
            call(i)
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        evs = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    else:
        evs = [e for e in prof.events() if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    total_us = sum(e.time_range.elapsed_us() for e in evs)
    return total_us / 1e3 / reps, len(evs) / reps


def device_time(fn: Callable, input_sets: List[Dict], mode: str, reps: int, device: str = "cuda",
                method: str = "graph") -> Tuple[Optional[float], str, Optional[float]]:
    """(device ms per call or None, method used, kernels per call or None). ``graph`` falls back to
    ``profiler`` (method "profiler(graph failed: ...)") when the call cannot be captured."""
    import torch

    if method == "none":
        return None, "none", None
    used = method
    ms = None
    if method == "graph" and device == "cuda":
        try:
            ms = _graph_ms(fn, input_sets, mode, reps)
        except Exception as e:  # capture unsupported by some op: say so in the row, measure otherwise
            torch.cuda.synchronize()
            used = f"profiler(graph failed: {type(e).__name__})"
    elif method == "graph":
        used = "profiler"                                   # no CUDA graphs on the CPU smoke run
    _free_grads(input_sets)
    prof_reps = max(3, min(reps, 20)) if device == "cuda" else max(1, reps)
    prof_ms, count = _profiler_ms(_make_call(fn, input_sets, mode), prof_reps, device)
    _free_grads(input_sets)
    if ms is None:
        ms = prof_ms
    return ms, used if device == "cuda" else f"{used}-cpu", count


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
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes (16-ish tokens, width 64) instead of the goal shapes: the CPU smoke recipe under "
                         "TRITON_INTERPRET=1 (with --batch 2), seconds per op; its timings mean nothing")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cuda (real measurements) or cpu (smoke test of this harness under TRITON_INTERPRET=1)")
    ap.add_argument("--device-time", default="graph", choices=["graph", "profiler", "none"],
                    help="how device_ms is measured: CUDA-graph replay (host overhead removed; falls back to "
                         "profiler when capture fails), summed kernel durations from torch.profiler, or not at all")
    return ap.parse_args(argv)


FIELDS = ["date", "card", "torch", "triton", "cuda", "op", "case", "dtype", "mode", "provider", "ms", "gbps",
          "frac_bw", "speedup_vs_eager", "device_ms", "device_gbps", "device_frac_bw", "device_speedup_vs_eager",
          "device_method", "kernels_per_call", "hbm_gbps"]


def _check_csv(path: Path) -> None:
    """Refuse, before measuring, to append to a CSV written by a harness with other columns."""
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:
            sys.exit(f"benchmarks/kernels: {path} has other columns ({len(header)}; this harness writes "
                     f"{len(FIELDS)}: {','.join(FIELDS)}); pass --csv with a new file")


def run(op: str, cases_fn: Callable, make_fn: Callable[[str], Callable], argv=None) -> List[Dict]:
    """Time every case x mode x provider; print a table and append to the CSV.

    ``cases_fn(batch, device, tiny)`` gives dicts with ``name``, ``make(dtype, seed) -> inputs`` and
    ``bytes(mode, dtype) -> int`` (the least traffic the op must move); ``make_fn(provider)`` returns the
    callable taking ``**inputs``.
    """
    args = parse_args(op, argv)
    require_gpu(args.device)
    import torch

    cases = cases_fn(args.batch, args.device, args.tiny)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    modes = [m for m in args.modes.split(",") if m]
    providers = [p for p in args.providers.split(",") if p]
    reps = 20 if args.quick else args.reps
    info = env_info(args.device)
    bw = hbm_bandwidth_gbps(args.device)
    print(f"# {op} | {info['card']} | torch {info['torch']} triton {info['triton']} CUDA {info['cuda']} | "
          f"{info['date']} | measured copy bandwidth {bw:.0f} GB/s")
    rows = []
    path = Path(args.csv)
    _check_csv(path)
    print(f"{'case':28s} {'mode':8s} {'provider':14s} {'wall ms':>9s} {'x eager':>7s} | {'device ms':>9s} "
          f"{'GB/s':>8s} {'% bw':>5s} {'x eager':>7s} {'kern/call':>9s}  method")
    for case in (cases[:1] if args.quick else cases):
        first = case["make"](dtype, 0)
        per_set = sum(v.numel() * v.element_size() for v in first.values() if isinstance(v, torch.Tensor))
        sets = [first] + [case["make"](dtype, s) for s in range(1, n_rotations(per_set))]
        fns = {p: make_fn(p) for p in providers}
        for mode in modes:
            base = dbase = None
            nbytes = case["bytes"](mode, dtype)
            for p in providers:
                ms = time_provider(fns[p], sets, mode, reps, args.device)
                dms, method, kcount = device_time(fns[p], sets, mode, reps, args.device, args.device_time)
                gbps = nbytes / (ms * 1e-3) / 1e9
                if p == "torch-eager":
                    base, dbase = ms, dms
                row = dict(info, op=op, case=case["name"], dtype=args.dtype, mode=mode, provider=p,
                           ms=f"{ms:.4f}", gbps=f"{gbps:.1f}", frac_bw=f"{gbps / bw:.3f}",
                           speedup_vs_eager="" if base is None else f"{base / ms:.2f}",
                           device_ms="", device_gbps="", device_frac_bw="", device_speedup_vs_eager="",
                           device_method=method, kernels_per_call="" if kcount is None else f"{kcount:.1f}",
                           hbm_gbps=f"{bw:.0f}")
                if dms:
                    dg = nbytes / (dms * 1e-3) / 1e9
                    row.update(device_ms=f"{dms:.4f}", device_gbps=f"{dg:.1f}", device_frac_bw=f"{dg / bw:.3f}",
                               device_speedup_vs_eager="" if not dbase else f"{dbase / dms:.2f}")
                rows.append(row)
                dpct = f"{100 * float(row['device_frac_bw']):5.1f}" if row["device_frac_bw"] else "    -"
                print(f"{case['name']:28s} {mode:8s} {p:14s} {ms:9.4f} {'x' + (row['speedup_vs_eager'] or '-'):>7s} | "
                      f"{row['device_ms'] or '-':>9s} {row['device_gbps'] or '-':>8s} {dpct} "
                      f"{'x' + (row['device_speedup_vs_eager'] or '-'):>7s} {row['kernels_per_call'] or '-':>9s}  "
                      f"{method}", flush=True)
        del sets
        if args.device == "cuda":
            torch.cuda.empty_cache()
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or not path.stat().st_size
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")
    return rows


def compiled(fn: Callable) -> Callable:
    import torch

    return torch.compile(fn, dynamic=False)
