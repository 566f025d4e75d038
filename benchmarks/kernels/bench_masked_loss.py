"""Micro-benchmark: masked norm-pix latent loss (MAE-XL: 4x28x28 latents, patch 2, 75% masked), GPU only.

python benchmarks/kernels/bench_masked_loss.py [--dtype bf16] [--quick]
"""
import functools
import sys

from _bench import compiled, run


def _cases(batch, dev, tiny=False):
    from _helpers_kernels import loss_inputs

    out = []
    for N, C, img, p in ((batch, 4, 8, 2), (batch, 4, 6, 2)) if tiny else ((batch, 4, 28, 2), (batch, 4, 32, 2)):
        for norm in ((True, False), (True, True)):
            make = functools.partial(lambda dt, s, dev=dev, N=N, C=C, img=img, p=p, norm=norm: loss_inputs(
                N, C, img, p, 0.75, *norm, dtype=dt, device=dev, seed=s))
            L, P = (img // p) ** 2, p * p * C
            # forward: the masked 75% of pred and of the latents; backward: those again, write all of grad
            fwd = 0.75 * N * L * P * 2
            out.append(dict(name=f"{N}x{C}x{img}p{p}-{'image' if norm[1] else 'patch'}", make=make,
                            bytes=lambda mode, dt, fwd=fwd, full=N * L * P: dt.itemsize * {
                                "forward": fwd, "backward": fwd + full, "full": 2 * fwd + full}[mode]))
    return out


def _fn(provider):
    from usp_scale.layers import fused

    f = functools.partial(fused.masked_latent_loss, impl="triton" if provider == "triton" else "torch")
    return compiled(f) if provider == "torch-compile" else f


def main(argv=None):
    run("masked_latent_loss", _cases, _fn, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
