"""The Triton ops are torch.library custom ops: torch.compile treats them as opaque calls, with
autograd, and gives the same values and gradients as eager. (On CPU through the interpreter.)"""
import functools

import pytest
import torch

from _helpers_kernels import (assert_matches, embed_inputs, gated_inputs, kernel_devices, ln_mod_inputs,
                              loss_inputs, unshuffle_inputs)
from usp_scale.layers import fused

CASES = {
    "embed_visible_patches": lambda dev: embed_inputs(3, 4, 14, 2, 72, 0.75, device=dev),
    "unshuffle": lambda dev: unshuffle_inputs(3, 49, 0.75, 72, device=dev),
    "masked_latent_loss": lambda dev: loss_inputs(3, 4, 14, 2, 0.75, True, True, device=dev),
    "layernorm_modulate": lambda dev: ln_mod_inputs(3, 49, 72, affine=True, device=dev),
    "gated_residual": lambda dev: gated_inputs(3, 49, 72, device=dev),
}


@pytest.mark.slow
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("op", list(CASES))
def test_compiled_triton_op_matches_eager(device, op):
    torch._dynamo.reset()
    eager = functools.partial(getattr(fused, op), impl="triton")
    compiled = torch.compile(eager, fullgraph=True)          # fullgraph: no graph break allowed
    assert_matches(compiled, eager, CASES[op](device), torch.float32, f"compiled {op}")


@pytest.mark.slow
@pytest.mark.parametrize("device", kernel_devices())
def test_compiled_tiny_dit_with_kernels(device):
    """A whole (tiny) DiT with kernels="triton" under torch.compile matches the eager torch model."""
    import copy

    from usp_scale.models.registry import create_model

    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = create_model("DiT-tiny/2-VAE-simple", kernels="torch").to(device).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = copy.deepcopy(ref)
    fast.set_kernels("triton")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=g).to(device)
    t = (torch.rand(3, generator=g) * 999).to(device)
    y = torch.randint(0, 10, (3,), generator=g).to(device)
    out_c = torch.compile(fast)(x, t, y)
    out_r = ref(x, t, y)
    torch.testing.assert_close(out_c, out_r, rtol=1e-4, atol=1e-5)
    out_c.square().mean().backward()
    out_r.square().mean().backward()
    for (n, a), (_, b) in zip(fast.named_parameters(), ref.named_parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-6, msg=n)


@pytest.mark.parametrize("device", kernel_devices()[:1])
def test_eager_calls_skip_the_custom_op_dispatch(device):
    """In eager mode the autograd.Functions launch the kernels directly: no usp_scale_kernels:: op shows
    up in the profile of forward + backward (while calling the op itself does: the check can fail)."""
    from torch.profiler import ProfilerActivity, profile

    from usp_scale.kernels import masked_loss

    def ops_seen(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return {e.name for e in prof.events() if e.name.startswith("usp_scale_kernels::")}

    inp = loss_inputs(3, 4, 14, 2, 0.75, True, False, device=device, grad=False)
    args = (inp["pred"], inp["latents"], inp["mask"], 2, True, False, False, torch.float32)
    assert ops_seen(lambda: masked_loss._loss_fwd.op(*args)) == {"usp_scale_kernels::masked_loss_fwd"}
    for op, make in CASES.items():
        inp = make(device)
        fn = getattr(fused, op)
        assert ops_seen(lambda: fn(**inp, impl="triton").sum().backward()) == set(), op
