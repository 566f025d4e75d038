"""Triton adaLN LayerNorm-modulate and gated residual vs the torch references."""
import pytest
import torch

from _helpers_kernels import DTYPES, assert_matches, gated_inputs, kernel_devices, ln_mod_inputs
from usp_scale.layers import fused


def _ln_triton(**kw):
    return fused.layernorm_modulate(**kw, impl="triton")


def _ln_torch(**kw):
    return fused.layernorm_modulate(**kw, impl="torch")


def _gr_triton(**kw):
    return fused.gated_residual(**kw, impl="triton")


def _gr_torch(**kw):
    return fused.gated_residual(**kw, impl="torch")


SHAPES = [(3, 49, 1152), (5, 196, 72), (1, 1, 32), (2, 256, 64)]   # (N, T, D)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layernorm_modulate(device, dtype, affine, shape):
    inp = ln_mod_inputs(*shape, affine=affine, dtype=dtype, device=device)
    grads = ["x", "shift", "scale"] + (["weight", "bias"] if affine else [])
    assert_matches(_ln_triton, _ln_torch, inp, dtype, f"ln_mod {shape} {affine} {dtype}", expect_grads=grads)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_residual(device, dtype, shape):
    inp = gated_inputs(*shape, dtype=dtype, device=device)
    assert_matches(_gr_triton, _gr_torch, inp, dtype, f"gated {shape} {dtype}", expect_grads=["x", "gate", "y"])


@pytest.mark.parametrize("device", kernel_devices())
def test_adaln_under_autocast_mixed(device):
    """DiT under bf16 autocast: fp32 residual stream, bf16 shift/scale/gate and branch output."""
    inp = ln_mod_inputs(3, 49, 72, affine=True, device=device)
    for k in ("shift", "scale"):
        inp[k] = inp[k].detach().bfloat16().requires_grad_()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        assert_matches(_ln_triton, _ln_torch, inp, torch.bfloat16, "ln_mod autocast")
    g = gated_inputs(3, 49, 72, device=device)
    for k in ("gate", "y"):
        g[k] = g[k].detach().bfloat16().requires_grad_()
    assert_matches(_gr_triton, _gr_torch, g, torch.bfloat16, "gated mixed")


def test_adaln_shape_errors():
    inp = ln_mod_inputs(2, 5, 16, grad=False)
    with pytest.raises(ValueError, match="shift must be"):
        fused.layernorm_modulate(**{**inp, "shift": inp["shift"][:1]}, impl="triton")
    g = gated_inputs(2, 5, 16, grad=False)
    with pytest.raises(ValueError, match="gate must be"):
        fused.gated_residual(**{**g, "gate": g["gate"][:, :3]}, impl="triton")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("tiling", [(4, 3), (8, 1), (2, 7)], ids=str)
def test_layernorm_modulate_backward_multi_tile_loop(device, tiling, monkeypatch):
    """The GPU tiling (few programs, each looping over many row tiles, ragged chunk ends) under test."""
    from usp_scale.kernels import adaln

    monkeypatch.setattr(adaln, "BWD_TILING_OVERRIDE", tiling)
    inp = ln_mod_inputs(3, 49, 72, affine=True, device=device)
    assert_matches(_ln_triton, _ln_torch, inp, torch.float32, f"ln_mod tiling {tiling}",
                   expect_grads=["x", "weight", "bias", "shift", "scale"])


@pytest.mark.parametrize("device", kernel_devices())
def test_layernorm_modulate_weight_without_bias(device):
    """LayerNorm(bias=False): gamma only."""
    inp = ln_mod_inputs(3, 49, 72, affine=True, device=device)
    inp["bias"] = None
    assert_matches(_ln_triton, _ln_torch, inp, torch.float32, "ln_mod gamma only",
                   expect_grads=["x", "weight", "shift", "scale"])


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("tiling", [(4, 3), (2, 7), (8, 1)], ids=str)
def test_gated_residual_backward_multi_tile_loop(device, tiling, monkeypatch):
    """Gated-residual backward with the GPU-style loop: each program walks several row tiles of one
    sample (prefetching the next), ragged chunk ends, one partial row of d gate per program."""
    from usp_scale.kernels import adaln

    monkeypatch.setattr(adaln, "BWD_TILING_OVERRIDE", tiling)
    inp = gated_inputs(3, 49, 72, device=device)
    assert_matches(_gr_triton, _gr_torch, inp, torch.float32, f"gated tiling {tiling}",
                   expect_grads=["x", "gate", "y"])
