"""Triton visible-patch embedding (gather + GEMM + pos gather-add) vs the torch reference."""
import pytest
import torch

from _helpers_kernels import DTYPES, assert_matches, embed_inputs, kernel_devices
from usp_scale.layers import fused
from usp_scale.layers.patch import patchify
from usp_scale.layers.masking import gather_tokens


def _triton(**kw):
    return fused.embed_visible_patches(**kw, impl="triton")


def _torch(**kw):
    return fused.embed_visible_patches(**kw, impl="torch")


SHAPES = [  # (N, C, img, patch, D, ratio, bias): odd batch, L = 49 / 196 / 16, D = 72*16
    (3, 4, 14, 2, 1152, 0.75, True),
    (5, 4, 28, 2, 72, 0.75, False),
    (2, 16, 8, 2, 64, 0.5, True),
    (2, 16, 6, 1, 32, 0.6, True),      # d16 latents with patch 1: P = C = 16, L = 36
    (3, 3, 10, 2, 40, 0.75, True),     # P = 12: not a power of two (padded to 16 for tl.dot)
    (2, 1, 8, 2, 24, 0.5, False),      # P = 4 < 16
]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_embed_visible_patches(device, dtype, shape):
    N, C, img, p, D, ratio, bias = shape
    inp = embed_inputs(N, C, img, p, D, ratio, bias, dtype=dtype, device=device)
    assert_matches(_triton, _torch, inp, dtype, f"embed {shape} {dtype}",
                   expect_grads=["latents", "weight"] + (["bias"] if bias else []))


@pytest.mark.parametrize("device", kernel_devices())
def test_gather_patches_exact(device):
    """The gather kernel alone is a pure copy: bit-equal to patchify + gather, also in bf16."""
    from usp_scale.kernels import gather_patches

    for dtype in DTYPES:
        inp = embed_inputs(3, 4, 14, 2, 8, 0.75, dtype=dtype, device=device, grad=False)
        ref = gather_tokens(patchify(inp["latents"], 2), inp["ids_keep"])
        assert torch.equal(gather_patches(inp["latents"], inp["ids_keep"], 2), ref)


@pytest.mark.parametrize("device", kernel_devices())
def test_embed_under_autocast(device):
    """fp32 params and latents under bf16 autocast: same output dtype (fp32, pos added after a bf16
    GEMM) and values as the reference under the same autocast."""
    inp = embed_inputs(3, 4, 14, 2, 72, 0.75, dtype=torch.float32, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        assert_matches(_triton, _torch, inp, torch.bfloat16, "embed autocast")


def test_embed_bad_input_messages():
    inp = embed_inputs(2, 4, 8, 2, 16, 0.5, grad=False)
    with pytest.raises(ValueError, match="weight must be"):
        fused.embed_visible_patches(**{**inp, "weight": inp["weight"][:, :2]}, impl="triton")
    with pytest.raises(ValueError, match="pos must be"):
        fused.embed_visible_patches(**{**inp, "pos": inp["pos"][:, :3]}, impl="triton")


# Which inputs need a gradient: the MAE training case (weight + bias: [dW | db] from one GEMM with the
# ones column), a learned pos table alone (dpos kernel), bias alone (ones column without dW), and weight
# alone (patches saved without the ones column).
GRAD_SETS = {"train": ("weight", "bias"), "pos_only": ("pos",), "bias_only": ("bias",), "weight_only": ("weight",)}


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", list(GRAD_SETS))
def test_embed_gradient_subsets(device, dtype, which):
    inp = embed_inputs(3, 4, 14, 2, 72, 0.75, dtype=dtype, device=device)
    for k in ("latents", "weight", "bias", "pos"):
        inp[k].requires_grad_(k in GRAD_SETS[which])
    assert_matches(_triton, _torch, inp, dtype, f"embed grads {which} {dtype}", expect_grads=GRAD_SETS[which])


@pytest.mark.parametrize("device", kernel_devices())
def test_embed_inference_and_deterministic_dpos(device):
    """No-grad forward (nothing saved) equals the reference; dpos, dW and db are bit-identical run to run
    (dpos by the fixed-order gather kernel, no atomics)."""
    inp = embed_inputs(5, 4, 14, 2, 72, 0.5, device=device)
    with torch.no_grad():
        torch.testing.assert_close(_triton(**inp), _torch(**inp), rtol=2e-5, atol=2e-5)
    go = torch.randn(5, inp["ids_keep"].shape[1], 72, generator=torch.Generator().manual_seed(3)).to(device)
    leaves = [inp[k] for k in ("weight", "bias", "pos")]
    g1 = torch.autograd.grad(_triton(**inp), leaves, go)
    g2 = torch.autograd.grad(_triton(**inp), leaves, go)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    # dpos against an explicit scatter-add: every kept token's gradient lands in its pos row
    ids = inp["ids_keep"]
    ref = torch.zeros(inp["pos"].shape[1], 72, device=device).index_add_(0, ids.reshape(-1), go.reshape(-1, 72))
    torch.testing.assert_close(g1[2][0], ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1[1], go.sum((0, 1)), rtol=1e-5, atol=1e-5)
