"""Micro-benchmark: visible-patch embedding (MAE-XL encoder input: 4x28x28, patch 2, 49 of 196 kept,
D = 1152), GPU only. The torch reference embeds all 196 patches then gathers (the official order).
Cases "-train" are the MAE training case (gradients for the conv weight and bias only: latents are data,
the sin-cos position table is frozen); "-allgrad" also differentiates latents and pos.

python benchmarks/kernels/bench_patch_embed.py [--dtype bf16] [--quick]
"""
import functools
import sys

from _bench import compiled, run


def _train_inputs(N, C, img, p, D, dt, s, dev, frozen):
    from _helpers_kernels import embed_inputs

    inp = embed_inputs(N, C, img, p, D, 0.75, dtype=dt, device=dev, seed=s)
    for k in frozen:                       # MAE: latents are data, the sin-cos pos table is not trained
        inp[k].requires_grad_(False)
    return inp


def _cases(batch, dev, tiny=False):
    out = []
    img1, img2, D = (8, 6, 64) if tiny else (28, 32, 1152)
    for N, C, img, p, D, frozen in ((batch, 4, img1, 2, D, ("latents", "pos")),
                                    (batch, 4, img2, 2, D, ("latents", "pos")),
                                    (batch, 4, img1, 2, D, ())):
        make = functools.partial(_train_inputs, N, C, img, p, D, dev=dev, frozen=frozen)
        K, P = int((img // p) ** 2 * 0.25), p * p * C
        # forward: read the kept patches and pos rows, write (N, K, D); backward: read grad (dW, db; dpos),
        # and with latents needing a gradient write the whole latents gradient
        fwd = N * K * (P + 2 * D)
        bwd = N * K * D + (N * C * img * img if "latents" not in frozen else 0)
        tag = "train" if frozen else "allgrad"
        out.append(dict(name=f"{N}x{C}x{img}p{p}-D{D}-{tag}",
                        make=lambda dt, s, make=make: make(dt, s),
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
