"""REPA's alignment loss (usp_scale/layers/projection_loss.py) against REPA's SILoss loop written out here: values
and gradients, awkward shapes, several teachers, fp16/bf16 inputs computed in fp32 (REPA issue #46)."""
import pytest
import torch
import torch.nn.functional as F

from usp_scale.layers.projection_loss import projection_loss, repa_total_loss


def repa_proj_loss(zs, zs_tilde):
    """REPA loss.py: for each teacher and each sample, mean over tokens of -(normalize(z) . normalize(z~)),
    summed, then divided by (teachers x batch)."""
    proj_loss = 0.0
    bsz = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            z_tilde_j = F.normalize(z_tilde_j, dim=-1)
            z_j = F.normalize(z_j, dim=-1)
            proj_loss = proj_loss + (-(z_j * z_tilde_j).sum(dim=-1)).mean()
    return proj_loss / (len(zs) * bsz)


@pytest.mark.parametrize("shapes", [[(4, 256, 768)], [(3, 7, 5), (3, 7, 13)], [(1, 1, 1)], [(5, 9, 2)] * 3])
def test_value_and_gradient_equal_repas_loop(shapes):
    g = torch.Generator().manual_seed(0)
    ys = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    hs = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    hs_ref = [h.detach().clone().requires_grad_(True) for h in hs]
    per_sample = projection_loss([y.float() for y in ys], [h.float() for h in hs])
    assert per_sample.shape == (shapes[0][0],) and per_sample.dtype == torch.float32
    ref = repa_proj_loss(ys, hs_ref)
    torch.testing.assert_close(per_sample.mean().double(), ref, atol=1e-6, rtol=1e-6)
    per_sample.mean().backward()
    ref.backward()
    for h, r in zip(hs, hs_ref):
        torch.testing.assert_close(h.grad, r.grad, atol=1e-7, rtol=1e-4)
    # the per-sample values: -mean over tokens and teachers of the cosine
    cos = torch.stack([F.cosine_similarity(y, h.detach(), dim=-1).mean(1) for y, h in zip(ys, hs)]).mean(0)
    torch.testing.assert_close(per_sample.double(), -cos, atol=1e-6, rtol=1e-6)


def test_bounds_and_teacher_gets_no_gradient():
    y = torch.randn(2, 6, 4, requires_grad=True)
    assert projection_loss([y], [y * 3.0]).detach().allclose(torch.full((2,), -1.0))
    assert projection_loss([y], [-y]).detach().allclose(torch.full((2,), 1.0))
    h = torch.randn(2, 6, 4, requires_grad=True)
    projection_loss([y], [h]).sum().backward()
    assert y.grad is None and h.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_normalised_in_fp32(dtype):
    """Tokens of size ~300, whose squared norm (~6e6) does not fit fp16 (65504): the loss is computed in fp32 and
    equals the fp32 loss of the same tokens, its gradient finite in the input's dtype (REPA #46)."""
    g = torch.Generator().manual_seed(1)
    y = (torch.randn(2, 8, 64, generator=g) * 300).to(dtype)
    h = (torch.randn(2, 8, 64, generator=g) * 300).to(dtype).requires_grad_(True)
    out = projection_loss([y], [h])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, projection_loss([y.float()], [h.detach().float()]), atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert h.grad.dtype == dtype and torch.isfinite(h.grad.float()).all()


def test_shape_mismatches_are_refused():
    a, b = torch.randn(2, 256, 768), torch.randn(2, 1024, 768)
    with pytest.raises(ValueError, match=r"teacher 0 .*\(2, 256, 768\).*\(2, 1024, 768\).*token count"):
        projection_loss([a], [b])
    with pytest.raises(ValueError, match="2 teacher token sets for 1 projectors"):
        projection_loss([a, a], [a])


def test_total_is_diffusion_plus_coefficient_times_alignment():
    d, p = torch.tensor([0.7, 0.9]), torch.tensor([-0.4, -0.2])
    torch.testing.assert_close(repa_total_loss(d, p), d + 0.5 * p)
    torch.testing.assert_close(repa_total_loss(d, p, proj_coeff=2.0), d + 2.0 * p)
