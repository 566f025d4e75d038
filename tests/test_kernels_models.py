"""A tiny MAE and a tiny DiT give the same loss and gradients with kernels="triton" as with
kernels="torch" (Triton interpreter on CPU, or a GPU with TRITON_INTERPRET=0)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from _helpers_kernels import kernel_devices, rel_err
from usp_scale.models.registry import create_model


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable parameter off its init (adaLN-zero gates, zero heads) so all paths matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model_t, model_r, run, tol, what):
    loss_t, loss_r = run(model_t), run(model_r)
    loss_t.backward()
    loss_r.backward()
    assert abs(loss_t.item() - loss_r.item()) <= tol * abs(loss_r.item()), \
        f"{what}: loss {loss_t.item()} vs {loss_r.item()}"
    g_t, g_r = _grads(model_t), _grads(model_r)
    assert g_t.keys() == g_r.keys() and len(g_r) > 10
    worst = max(g_r, key=lambda n: rel_err(g_t[n], g_r[n]))
    assert rel_err(g_t[worst], g_r[worst]) <= tol, f"{what}: grad {worst} off by {rel_err(g_t[worst], g_r[worst]):.3g}"


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("norm", [(True, False), pytest.param((True, True), marks=pytest.mark.slow),
                                  pytest.param((False, False), marks=pytest.mark.slow)],
                         ids=["norm_pix", "norm_image", "plain"])
def test_mae_triton_equals_torch(device, norm):
    torch.manual_seed(0)
    ref = create_model("vit_tiny_patch_vae", norm_pix_loss=norm[0], norm_image=norm[1], kernels="torch").to(device)
    _perturb_(ref, 1)
    fast = copy.deepcopy(ref)
    fast.set_kernels("triton")
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(3, 4, 28, 28, generator=g).to(device)        # L = 196, 49 kept
    noise = torch.rand(3, 196, generator=g).to(device)

    def run(m):
        loss, pred, mask = m(latents, mask_ratio=0.75, noise=noise)
        return loss

    _compare(fast, ref, run, 2e-4, f"MAE {norm}")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("name", [pytest.param("DiT-tiny/2", marks=pytest.mark.slow), "DiT-tiny/2-VAE-simple",
                                  pytest.param("SiT-tiny/2-VAE-simple", marks=pytest.mark.slow)])
def test_dit_triton_equals_torch(device, name):
    torch.manual_seed(0)
    ref = create_model(name, kernels="torch").to(device)
    _perturb_(ref, 1)
    fast = copy.deepcopy(ref)
    fast.set_kernels("triton")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=g).to(device)
    t = torch.rand(3, generator=g).to(device) * 999
    y = torch.randint(0, 10, (3,), generator=g).to(device)
    ref.eval(), fast.eval()                                                # no label dropout
    with torch.no_grad():
        target = torch.randn(ref(x, t, y).shape, generator=g).to(device)

    def run(m):
        return F.mse_loss(m(x, t, y), target)

    _compare(fast, ref, run, 2e-4, name)


@pytest.mark.parametrize("device", kernel_devices())
def test_models_under_bf16_autocast(device):
    """The training precision: bf16 autocast over fp32 parameters (looser, bf16 tolerance)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    mae = create_model("vit_tiny_patch_vae", norm_pix_loss=True, kernels="torch").to(device)
    _perturb_(mae, 1)
    mae_fast = copy.deepcopy(mae)
    mae_fast.set_kernels("triton")
    latents = torch.randn(3, 4, 28, 28, generator=g).to(device)
    noise = torch.rand(3, 196, generator=g).to(device)
    dit = create_model("DiT-tiny/2-VAE-simple", kernels="torch").to(device).eval()
    _perturb_(dit, 1)
    dit_fast = copy.deepcopy(dit)
    dit_fast.set_kernels("triton")
    x = torch.randn(3, 4, 8, 8, generator=g).to(device)
    t = torch.rand(3, generator=g).to(device) * 999
    y = torch.randint(0, 10, (3,), generator=g).to(device)

    def run_mae(m):
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            return m(latents, mask_ratio=0.75, noise=noise)[0]

    def run_dit(m):
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            return m(x, t, y).float().square().mean()

    _compare(mae_fast, mae, run_mae, 3e-2, "MAE bf16 autocast")
    _compare(dit_fast, dit, run_dit, 3e-2, "DiT bf16 autocast")
