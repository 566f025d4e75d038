"""Count the device launches one call of each fused op issues, per provider and mode, on the CPU.

Runs under the Triton interpreter (TRITON_INTERPRET=1, no GPU needed) at a small shape: Triton launches
are counted by wrapping the kernels' ``run``, every other launch as one ATen compute op seen by a
TorchDispatchMode (allocations, views and metadata ops excluded; ops the interpreter itself issues while
running a kernel are not counted). ``custom_op`` counts torch.library dispatcher round-trips (host
overhead only; the launches inside them are counted too). Tiling is the interpreter's: on a GPU the
backward kernels split a sample into several chunks, adding one partial-sum reduction each. On a GPU most of these are one kernel each (a cuBLAS GEMM may be
more), so the table is a device-free proxy for ``kernels_per_call`` in the benchmark CSV: fewer launches
mean less host overhead per call. It does not say anything about kernel speed.

TRITON_INTERPRET=1 python benchmarks/kernels/count_launches.py [--ops embed_visible_patches,...]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))                     # the tests' input factories

# ATen ops that allocate, alias or only touch metadata: no kernel launch on a GPU.
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
         "as_strided", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze",
         "alias", "detach", "lift_fresh", "_reshape_alias", "unbind", "split", "reshape", "view_as",
         "lift_fresh_copy", "set_", "resize_", "is_same_size", "_to_copy_noop", "numpy_T", "split_with_sizes",
         "_local_scalar_dense", "promote_types", "result_type", "can_cast"}


def _cases():
    from _helpers_kernels import embed_inputs, gated_inputs, ln_mod_inputs, loss_inputs, unshuffle_inputs

    def embed_train():
        inp = embed_inputs(3, 4, 14, 2, 72, 0.75)
        inp["latents"].requires_grad_(False)           # MAE: latents are data, pos is the frozen sin-cos table
        inp["pos"].requires_grad_(False)
        return inp

    return {
        "embed_visible_patches[train]": ("embed_visible_patches", embed_train),
        "embed_visible_patches[allgrad]": ("embed_visible_patches", lambda: embed_inputs(3, 4, 14, 2, 72, 0.75)),
        "embed_visible_patches[train-autocast]": ("embed_visible_patches+autocast", embed_train),
        "unshuffle": ("unshuffle", lambda: unshuffle_inputs(3, 49, 0.75, 72)),
        "masked_latent_loss[patch]": ("masked_latent_loss", lambda: loss_inputs(3, 4, 14, 2, 0.75, True, False)),
        "masked_latent_loss[image]": ("masked_latent_loss", lambda: loss_inputs(3, 4, 14, 2, 0.75, True, True)),
        "layernorm_modulate": ("layernorm_modulate", lambda: ln_mod_inputs(3, 49, 72, affine=True)),
        "gated_residual": ("gated_residual", lambda: gated_inputs(3, 49, 72)),
    }


def count(fn, inputs, mode: str) -> collections.Counter:
    """Launches of ``fn(**inputs)`` in ``mode`` (forward under no_grad, or the backward alone)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import interpreter, jit

    counts = collections.Counter()
    state = {"in_triton": 0}

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if func.namespace == "usp_scale_kernels":      # a custom op: count what runs inside it
                from torch._library.custom_ops import OPDEFS

                counts[f"custom_op.{name}"] += 1
                with Ops():
                    return OPDEFS[f"usp_scale_kernels::{name}"]._init_fn(*args, **(kwargs or {}))
            if not state["in_triton"] and name not in _FREE:
                counts[f"aten.{name}"] += 1
            return func(*args, **(kwargs or {}))

    out = go = None
    if mode == "backward":                                  # the forward runs before anything is counted
        out = fn(**inputs)
        go = torch.ones_like(out)
    originals = {}
    for cls in (interpreter.InterpretedFunction, jit.JITFunction):
        originals[cls] = cls.run

        def run(self, *a, _orig=cls.run, **k):
            counts[f"triton.{getattr(self, '__name__', None) or self.fn.__name__}"] += 1
            state["in_triton"] += 1
            try:
                return _orig(self, *a, **k)
            finally:
                state["in_triton"] -= 1

        cls.run = run
    try:
        with Ops():
            if mode == "forward":
                with torch.no_grad():
                    fn(**inputs)
            else:
                out.backward(go)
    finally:
        for cls, orig in originals.items():
            cls.run = orig
    return counts


def _op_fn(fused, op: str, impl: str):
    """fused.<op> with ``impl``; "<op>+autocast" runs it under CPU bf16 autocast (the MAE training setup:
    fp32 parameters, bf16 matmuls)."""
    import torch

    name, _, ac = op.partition("+")
    fn = getattr(fused, name)
    if not ac:
        return lambda **kw: fn(**kw, impl=impl)

    def run(**kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(**kw, impl=impl)
    return run


def host_us(fn, make, mode: str, reps: int) -> float:
    """Median host microseconds of one call (``forward`` under no_grad, or ``full`` forward + backward)
    with every Triton launch replaced by a no-op: the Python, dispatch and allocation work around the
    kernels, which on a GPU is paid per call whenever the host does not run ahead of the device."""
    import statistics
    import time

    import torch
    from triton.runtime import interpreter, jit

    originals = {cls: cls.run for cls in (interpreter.InterpretedFunction, jit.JITFunction)}
    for cls in originals:
        cls.run = lambda self, *a, **k: None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)               # the few real ATen ops are tiny: no thread-pool wake-ups
    try:
        inputs = make()
        times = []
        for i in range(reps + 10):
            t0 = time.perf_counter()
            if mode == "forward":
                with torch.no_grad():
                    fn(**inputs)
            else:
                fn(**inputs).sum().backward()
            if i >= 10:
                times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)
        for cls, orig in originals.items():
            cls.run = orig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default="", help="comma list of case names (default: all)")
    ap.add_argument("--detail", action="store_true", help="also list the counted ops of every row")
    ap.add_argument("--host", type=int, default=0, metavar="REPS",
                    help="instead of counting, time the host work per Triton call (kernels stubbed out), "
                         "median of REPS calls, forward and forward+backward")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        sys.exit("count_launches.py runs the kernels on the CPU: set TRITON_INTERPRET=1")
    from usp_scale.layers import fused

    cases = _cases()
    names = [n for n in args.ops.split(",") if n] or list(cases)
    if args.host:
        print(f"{'case':38s} {'host us fwd':>11s} {'host us fwd+bwd':>15s}   (triton, kernels stubbed out)")
        for name in names:
            op, make = cases[name]
            fn = _op_fn(fused, op, "triton")
            print(f"{name:38s} {host_us(fn, make, 'forward', args.host):11.1f} "
                  f"{host_us(fn, make, 'full', args.host):15.1f}")
        return 0
    print(f"{'case':38s} {'mode':8s} {'provider':8s} {'triton':>6s} {'aten':>5s} {'total':>5s} {'custom_op':>9s}")
    for name in names:
        op, make = cases[name]
        for mode in ("forward", "backward"):
            for impl in ("torch", "triton"):
                c = count(_op_fn(fused, op, impl), make(), mode)
                tri = sum(v for k, v in c.items() if k.startswith("triton."))
                aten = sum(v for k, v in c.items() if k.startswith("aten."))
                cop = sum(v for k, v in c.items() if k.startswith("custom_op."))
                print(f"{name:38s} {mode:8s} {impl:8s} {tri:6d} {aten:5d} {tri + aten:5d} {cop:9d}")
                if args.detail:
                    print("    " + ", ".join(f"{k} x{v}" for k, v in sorted(c.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
