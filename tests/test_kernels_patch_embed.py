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
