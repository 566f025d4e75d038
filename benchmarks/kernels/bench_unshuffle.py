"""Micro-benchmark: MAE decoder unshuffle (MAE-XL decoder: 196 tokens, 49 kept, width 512), GPU only.

python benchmarks/kernels/bench_unshuffle.py [--dtype bf16] [--quick]
"""
import functools
import sys

from _bench import compiled, run


def _cases(batch, dev, tiny=False):
    from _helpers_kernels import unshuffle_inputs

    out = []
    for N, L, D in ((batch, 16, 32), (batch, 12, 64)) if tiny else ((batch, 196, 512), (batch, 256, 1152)):
        K = int(L * 0.25)
        make = functools.partial(lambda dt, s, dev=dev, N=N, L=L, D=D: unshuffle_inputs(N, L, 0.75, D, dtype=dt,
                                                                               device=dev, seed=s))
        # forward: read x (1+K rows), write out (1+L rows); backward: read grad (1+L), write grad x (1+K)
        rows = {"forward": N * (2 + K + L), "backward": N * (2 + K + L), "full": 2 * N * (2 + K + L)}
        out.append(dict(name=f"{N}x{L}x{D}", make=make,
                        bytes=lambda mode, dt, rows=rows, D=D: rows[mode] * D * dt.itemsize))
    return out


def _fn(provider):
    from usp_scale.layers import fused

    f = functools.partial(fused.unshuffle, impl="triton" if provider == "triton" else "torch")
    return compiled(f) if provider == "torch-compile" else f


def main(argv=None):
    run("unshuffle", _cases, _fn, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
