"""Triton masked norm-pix latent loss (per patch, per image, plain) vs the torch reference."""
import pytest
import torch

from _helpers_kernels import DTYPES, assert_matches, kernel_devices, loss_inputs
from usp_scale.layers import fused


def _triton(**kw):
    return fused.masked_latent_loss(**kw, impl="triton")


def _torch(**kw):
    return fused.masked_latent_loss(**kw, impl="torch")


SHAPES = [(3, 4, 14, 2, 0.75), (5, 4, 28, 2, 0.75), (2, 16, 8, 1, 0.5), (3, 1, 6, 2, 0.6)]  # N, C, img, p, ratio
NORMS = [(True, False), (True, True), (False, False)]                                        # norm_pix, per_image


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS, ids=["per_patch", "per_image", "plain"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_masked_latent_loss(device, dtype, norm, shape):
    N, C, img, p, ratio = shape
    inp = loss_inputs(N, C, img, p, ratio, *norm, dtype=dtype, device=device)
    assert_matches(_triton, _torch, inp, dtype, f"loss {shape} {norm} {dtype}", expect_grads=["pred"])


@pytest.mark.parametrize("device", kernel_devices())
def test_loss_mixed_dtypes(device):
    """bf16 prediction (autocast decoder) against fp32 latents: fp32 loss, as the reference."""
    inp = loss_inputs(3, 4, 14, 2, 0.75, dtype=torch.float32, device=device)
    inp["pred"] = inp["pred"].detach().bfloat16().requires_grad_()
    assert_matches(_triton, _torch, inp, torch.bfloat16, "loss mixed")


def test_loss_errors():
    inp = loss_inputs(2, 4, 8, 2, 0.5, grad=False)
    with pytest.raises(ValueError, match="norm_image"):
        fused.masked_latent_loss(**{**inp, "norm_pix": False, "per_image": True}, impl="triton")
    with pytest.raises(ValueError, match="pred must be"):
        fused.masked_latent_loss(**{**inp, "pred": inp["pred"][:, :3]}, impl="triton")
