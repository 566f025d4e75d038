"""Micro-benchmark: adaLN LayerNorm-modulate and gated residual (DiT-XL/2 shapes), GPU only.

python benchmarks/kernels/bench_adaln.py [--dtype bf16] [--quick]
"""
import functools
import sys

from _bench import compiled, run


def _cases(op, batch, dev, tiny=False):
    from _helpers_kernels import gated_inputs, ln_mod_inputs

    out = []
    for N, T, D in ((batch, 16, 64), (batch, 12, 64)) if tiny else ((batch, 256, 1152), (batch, 196, 1152)):
        nt = N * T * D
        if op == "layernorm_modulate":
            for affine in (False, True):
                make = functools.partial(lambda dt, s, dev=dev, N=N, T=T, D=D, a=affine: ln_mod_inputs(
                    N, T, D, affine=a, dtype=dt, device=dev, seed=s))
                # forward: read x, write y; backward: read x, dy, write dx (per-sample vectors negligible)
                out.append(dict(name=f"{N}x{T}x{D}{'-affine' if affine else ''}", make=make,
                                bytes=lambda mode, dt, nt=nt: nt * dt.itemsize * {"forward": 2, "backward": 3,
                                                                                   "full": 5}[mode]))
        else:
            make = functools.partial(lambda dt, s, dev=dev, N=N, T=T, D=D: gated_inputs(N, T, D, dtype=dt, device=dev,
                                                                              seed=s))
            # forward: read x, y, write out; backward: read grad, y, write dy (grad x is grad out itself)
            out.append(dict(name=f"{N}x{T}x{D}", make=make,
                            bytes=lambda mode, dt, nt=nt: nt * dt.itemsize * {"forward": 3, "backward": 3,
                                                                               "full": 6}[mode]))
    return out


def _fn(op, provider):
    from usp_scale.layers import fused

    impl = "triton" if provider == "triton" else "torch"
    f = functools.partial(getattr(fused, op), impl=impl)
    return compiled(f) if provider == "torch-compile" else f


def main(argv=None):
    for op in ("layernorm_modulate", "gated_residual"):
        run(op, functools.partial(_cases, op), functools.partial(_fn, op), argv)


if __name__ == "__main__":
    main(sys.argv[1:])
