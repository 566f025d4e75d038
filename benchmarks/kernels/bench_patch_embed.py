"""Micro-benchmark: visible-patch embedding (MAE-XL encoder input: 4x28x28, patch 2, 49 of 196 kept,
D = 1152), GPU only. The torch reference embeds all 196 patches then gathers (the official order).

python benchmarks/kernels/bench_patch_embed.py [--dtype bf16] [--quick]
"""
import functools
import sys

from _bench import compiled, run


def _cases(batch, dev):
    from _helpers_kernels import embed_inputs

    out = []
    for N, C, img, p, D in ((batch, 4, 28, 2, 1152), (batch, 4, 32, 2, 1152)):
        make = functools.partial(lambda dt, s, dev=dev, N=N, C=C, img=img, p=p, D=D: embed_inputs(
            N, C, img, p, D, 0.75, dtype=dt, device=dev, seed=s))
        K, P = int((img // p) ** 2 * 0.25), p * p * C
        # forward: read the kept patches and pos rows, write (N, K, D); backward: read grad, write latents grad
        fwd = N * K * (P + 2 * D)
        bwd = N * K * D + N * C * img * img
        out.append(dict(name=f"{N}x{C}x{img}p{p}-D{D}", make=make,
                        bytes=lambda mode, dt, fwd=fwd, bwd=bwd: dt.itemsize * {
                            "forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]))
    return out


def _fn(provider):
    from usp_scale.layers import fused

    f = functools.partial(fused.embed_visible_patches, impl="triton" if provider == "triton" else "torch")
    return compiled(f) if provider == "torch-compile" else f


def main(argv=None):
    run("embed_visible_patches", _cases, _fn, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
