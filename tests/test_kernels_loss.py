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


@pytest.mark.parametrize("device", kernel_devices())
def test_loss_without_pred_grad(device):
    """pred not requiring grad (or grad mode off): forward only, no gradient buffer, same value."""
    inp = loss_inputs(3, 4, 14, 2, 0.75, True, False, device=device, grad=False)
    ref = _torch(**inp)
    out = _triton(**inp)
    assert not out.requires_grad and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=0)
    inp = loss_inputs(3, 4, 14, 2, 0.75, True, True, device=device)
    with torch.no_grad():
        out = _triton(**inp)
    assert not out.requires_grad
    torch.testing.assert_close(out, _torch(**{**inp, "pred": inp["pred"].detach()}), rtol=2e-5, atol=0)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("norm", NORMS, ids=["per_patch", "per_image", "plain"])
def test_loss_grad_scaling_and_determinism(device, norm):
    """The forward stores the unscaled gradient; backward scales it by grad_loss / sum(m): a loss
    weight of 2.5 and a second backward through the same graph both give the reference's gradient,
    and two runs are bit-identical (no atomics)."""
    inp = loss_inputs(5, 4, 28, 2, 0.75, *norm, device=device)
    pred = inp["pred"]
    ref = torch.autograd.grad(2.5 * _torch(**inp), pred)[0]
    loss = _triton(**inp)
    g1 = torch.autograd.grad(2.5 * loss, pred, retain_graph=True)[0]
    g2 = torch.autograd.grad(-1.0 * loss, pred)[0]
    torch.testing.assert_close(g1, ref, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(g2, ref / -2.5, rtol=1e-5, atol=1e-9)
    loss_b = _triton(**inp)
    assert torch.equal(loss, loss_b)
    assert torch.equal(torch.autograd.grad(2.5 * loss_b, pred)[0], g1)


def test_loss_refuses_latents_grad():
    inp = loss_inputs(2, 4, 8, 2, 0.5)
    inp["latents"].requires_grad_(True)
    with pytest.raises(ValueError, match="no gradient for latents"):
        _triton(**inp)
