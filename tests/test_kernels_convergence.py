"""Short training runs with and without the Triton kernels (as Liger-Kernel's test/convergence does): a tiny MAE
(norm-pix loss) and a tiny DiT (the DDPM loss with learned sigma) from the same initialisation, the same batches
and noise, the project's AdamW over the official parameter groups, a few optimizer steps. Every step's loss and
the weight updates must agree within the stated tolerances, and the kernel run must really have launched the
kernels."""
import copy

import pytest
import torch

from _helpers_kernels import kernel_devices
from usp_scale.config import OptimConfig
from usp_scale.diffusion import create_diffusion
from usp_scale.layers import fused
from usp_scale.models import create_model
from usp_scale.training.optim import build_optimizer, model_param_groups

STEPS = 4
# Per precision: (loss rtol per step, ||update_kernels - update_torch|| / ||update_torch|| over all parameters,
# max |weight difference|). fp32 differs only in summation order. Under bf16 autocast the kernels keep fp32
# intermediates where the reference rounds to bf16, and Adam turns those gradient differences into sign-level
# update differences for small-gradient elements, so only the aggregate update is compared there.
TOLS = {"fp32": (1e-5, 1e-4, 5e-5), "bf16": (1e-2, 0.15, None)}


def _update_part(name: str, t: torch.Tensor) -> torch.Tensor:
    """The key third of a qkv bias has a zero gradient in exact arithmetic (softmax ignores a shift shared by
    all keys); Adam turns its rounding noise into +-lr steps in either run, so it is left out of the comparison."""
    if name.endswith("attn.qkv.bias"):
        t = t.clone()
        d = t.shape[0] // 3
        t[d:2 * d] = 0
    return t


def _batches(family, device, n=2):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        if family == "mae":
            out.append(dict(latents=torch.randn(n, 4, 28, 28, generator=g), noise=torch.rand(n, 196, generator=g)))
        else:
            out.append(dict(latents=torch.randn(n, 4, 8, 8, generator=g), labels=torch.randint(0, 10, (n,), generator=g),
                            t=torch.randint(0, 1000, (n,), generator=g), eps=torch.randn(n, 4, 8, 8, generator=g)))
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def _train(model, family, batches, precision, device):
    opt = build_optimizer(OptimConfig(lr=1e-3, weight_decay=0.05, fused=False), model_param_groups(model, 0.05),
                          torch.device(device))
    diffusion = create_diffusion() if family == "dit" else None
    losses = []
    model.train()
    for b in batches:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if family == "mae":
                loss = model(b["latents"], mask_ratio=0.75, noise=b["noise"])[0]
            else:
                loss = diffusion.training_losses(model, b["latents"], b["t"], dict(y=b["labels"]),
                                                 noise=b["eps"])["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family,name", [("mae", "vit_tiny_patch_vae"), ("dit", "DiT-tiny/2-VAE-simple")])
def test_training_with_and_without_kernels(device, precision, family, name, monkeypatch):
    torch.manual_seed(0)
    kw = dict(norm_pix_loss=True) if family == "mae" else dict(class_dropout_prob=0.0)   # no label dropout draws
    ref = create_model(name, kernels="torch", **kw).to(device)
    fast = copy.deepcopy(ref)
    fast.set_kernels("triton")
    init = {n: p.detach().clone() for n, p in ref.named_parameters()}
    batches = _batches(family, device)

    launched = []
    real = fused.kernels  # the kernel package, whose functions the fused entry points call

    class Spy:
        def __getattr__(self, op):
            launched.append(op)
            return getattr(real, op)

    loss_r, w_r = _train(ref, family, batches, precision, device)
    assert not launched
    monkeypatch.setattr(fused, "kernels", Spy())
    loss_f, w_f = _train(fast, family, batches, precision, device)
    want = ({"embed_visible_patches", "unshuffle", "masked_latent_loss"} if family == "mae"
            else {"layernorm_modulate", "gated_residual"})
    assert set(launched) == want

    rtol, upd_tol, atol = TOLS[precision]
    for i, (a, b) in enumerate(zip(loss_f, loss_r)):
        assert abs(a - b) <= rtol * abs(b), f"step {i}: loss {a} with kernels vs {b}"
    diff = {n: _update_part(n, w_f[n] - w_r[n]) for n in w_r}
    upd = {n: _update_part(n, w_r[n] - init[n]) for n in w_r}
    rel = (sum(d.double().square().sum() for d in diff.values()).sqrt()
           / sum(u.double().square().sum() for u in upd.values()).sqrt()).item()
    assert rel <= upd_tol, f"the weight updates differ by {rel:.3g} (relative)"
    if atol is not None:
        worst = max(diff, key=lambda n: diff[n].abs().max().item())
        assert diff[worst].abs().max().item() <= atol, f"final weights differ most at {worst}"
    assert loss_r[-1] < loss_r[0]                 # it trained
