"""Input factories, tolerances and comparison helpers shared by the kernel tests and
benchmarks/kernels/ (which import this module by path)."""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Sequence

import pytest
import torch

from usp_scale.layers.masking import masking_indices, num_kept

# Normalised max error max|a - b| / max|b| allowed per dtype. bf16: the reference rounds its own
# intermediates to bf16 while the kernels accumulate in fp32, and Triton's interpreter truncates
# fp32 -> bf16 instead of rounding (one bf16 ulp, 2^-8 relative).
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.bfloat16]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_devices() -> List:
    """pytest params: "cpu" under the interpreter, "cuda" on a GPU with the interpreter off."""
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")),
        pytest.param("cuda", marks=[pytest.mark.gpu,
                                    pytest.mark.skipif(interpreting() or not torch.cuda.is_available(),
                                                       reason="needs CUDA and TRITON_INTERPRET=0")]),
    ]


def _gen(seed: int, device) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _rand(shape, g, dtype, device, scale=1.0, shift=0.0, grad=False) -> torch.Tensor:
    t = (torch.randn(shape, generator=g) * scale + shift).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def masking(N: int, L: int, ratio: float, g: torch.Generator, device):
    ids_keep, ids_restore, mask = masking_indices(torch.rand(N, L, generator=g), num_kept(L, ratio))
    return ids_keep.to(device), ids_restore.to(device), mask.to(device)


def embed_inputs(N=3, C=4, img=14, patch=2, D=72, ratio=0.75, bias=True, dtype=torch.float32, device="cpu",
                 seed=0, grad=True) -> Dict:
    g = _gen(seed, device)
    L = (img // patch) ** 2
    ids_keep, _, _ = masking(N, L, ratio, g, device)
    return dict(latents=_rand((N, C, img, img), g, dtype, device, grad=grad),
                weight=_rand((D, C, patch, patch), g, dtype, device, scale=0.2, grad=grad),
                bias=_rand((D,), g, dtype, device, grad=grad) if bias else None,
                pos=_rand((1, L, D), g, torch.float32 if dtype == torch.float32 else dtype, device, grad=grad),
                ids_keep=ids_keep, patch=patch)


def unshuffle_inputs(N=3, L=49, ratio=0.75, D=72, dtype=torch.float32, device="cpu", seed=0, grad=True,
                     pos=True) -> Dict:
    g = _gen(seed, device)
    _, ids_restore, _ = masking(N, L, ratio, g, device)
    K = num_kept(L, ratio)
    return dict(x=_rand((N, 1 + K, D), g, dtype, device, grad=grad),
                mask_token=_rand((1, 1, D), g, dtype, device, grad=grad),
                ids_restore=ids_restore,
                pos=_rand((1, 1 + L, D), g, dtype, device, grad=grad) if pos else None)


def loss_inputs(N=3, C=4, img=14, patch=2, ratio=0.75, norm_pix=True, per_image=False, dtype=torch.float32,
                device="cpu", seed=0, grad=True) -> Dict:
    g = _gen(seed, device)
    L = (img // patch) ** 2
    _, _, mask = masking(N, L, ratio, g, device)
    return dict(pred=_rand((N, L, patch * patch * C), g, dtype, device, grad=grad),
                latents=_rand((N, C, img, img), g, dtype, device, scale=2.0, shift=0.5),
                mask=mask, patch=patch, norm_pix=norm_pix, per_image=per_image)


def ln_mod_inputs(N=3, T=49, D=72, affine=True, dtype=torch.float32, device="cpu", seed=0, grad=True) -> Dict:
    g = _gen(seed, device)
    return dict(x=_rand((N, T, D), g, dtype, device, scale=2.0, shift=0.3, grad=grad),
                weight=_rand((D,), g, dtype, device, shift=1.0, grad=grad) if affine else None,
                bias=_rand((D,), g, dtype, device, grad=grad) if affine else None,
                shift=_rand((N, D), g, dtype, device, grad=grad),
                scale=_rand((N, D), g, dtype, device, scale=0.5, grad=grad),
                eps=1e-6)


def gated_inputs(N=3, T=49, D=72, dtype=torch.float32, device="cpu", seed=0, grad=True) -> Dict:
    g = _gen(seed, device)
    return dict(x=_rand((N, T, D), g, dtype, device, grad=grad), gate=_rand((N, D), g, dtype, device, grad=grad),
                y=_rand((N, T, D), g, dtype, device, grad=grad))


def grad_leaves(inputs: Dict) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def forward_backward(fn: Callable, inputs: Dict, seed: int = 1):
    """(output, {name: grad}) of fn(**inputs) with a fixed random output gradient."""
    out = fn(**inputs)
    leaves = grad_leaves(inputs)
    if out.dim() == 0:
        go = torch.ones_like(out)
    else:
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), go, allow_unused=True)
    return out, dict(zip(leaves, grads))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def upcast(inputs: Dict) -> Dict:
    """fp32 leaf copies of the floating-point tensors (the "truth" run for low-precision checks)."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = v.detach().float().requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def assert_matches(fn_test: Callable, fn_ref: Callable, inputs: Dict, dtype: torch.dtype, what: str,
                   expect_grads: Sequence[str] = ()) -> None:
    """Outputs and every gradient of fn_test agree with fn_ref on the same inputs.

    fp32: normalised max error <= TOL. Low precision: fn_test must be within TOL of fn_ref, or at most
    twice as far from the fp32 result (fn_ref on upcast inputs) as fn_ref itself is.
    """
    out_t, g_t = forward_backward(fn_test, inputs)
    out_r, g_r = forward_backward(fn_ref, inputs)
    truth = None
    if dtype != torch.float32:
        truth = forward_backward(fn_ref, upcast(inputs))
    tol = TOL[dtype]
    assert out_t.shape == out_r.shape and out_t.dtype == out_r.dtype, \
        f"{what}: output {tuple(out_t.shape)} {out_t.dtype} vs reference {tuple(out_r.shape)} {out_r.dtype}"
    for name in expect_grads:
        assert g_r.get(name) is not None and g_t.get(name) is not None, f"{what}: no gradient for {name}"
    pairs = [("output", out_t, out_r, None if truth is None else truth[0])]
    for name, gr in g_r.items():
        if gr is None:
            continue
        gt = g_t[name]
        assert gt is not None, f"{what}: kernel gave no gradient for {name}"
        assert gt.shape == gr.shape and gt.dtype == gr.dtype, \
            f"{what}: grad {name} {tuple(gt.shape)} {gt.dtype} vs {tuple(gr.shape)} {gr.dtype}"
        pairs.append((f"grad {name}", gt, gr, None if truth is None else truth[1][name]))
    for label, t, r, hi in pairs:
        e = rel_err(t, r)
        if e <= tol:
            continue
        assert hi is not None, f"{what}: {label} error {e:.3g} > {tol}"
        e_t, e_r = rel_err(t, hi), rel_err(r, hi)
        assert e_t <= 2 * e_r, (f"{what}: {label} differs from the reference by {e:.3g} > {tol} and is "
                                f"{e_t:.3g} from the fp32 result (reference: {e_r:.3g})")
