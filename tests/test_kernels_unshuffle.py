"""Triton decoder unshuffle (one pass, forward and backward) vs the torch reference."""
import pytest
import torch

from _helpers_kernels import DTYPES, assert_matches, kernel_devices, unshuffle_inputs
from usp_scale.layers import fused


def _triton(**kw):
    return fused.unshuffle(**kw, impl="triton")


def _torch(**kw):
    return fused.unshuffle(**kw, impl="torch")


SHAPES = [(3, 49, 0.75, 1152), (5, 196, 0.75, 72), (1, 16, 0.5, 32)]   # (N, L, ratio, D)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[3]}")
def test_unshuffle(device, dtype, shape):
    N, L, ratio, D = shape
    inp = unshuffle_inputs(N, L, ratio, D, dtype=dtype, device=device)
    assert_matches(_triton, _torch, inp, dtype, f"unshuffle {shape} {dtype}",
                   expect_grads=["x", "mask_token", "pos"])


@pytest.mark.parametrize("device", kernel_devices())
def test_unshuffle_mixed_dtypes_and_no_pos(device):
    """bf16 tokens with an fp32 mask token and fp32 table (autocast decoder): fp32 output, the mask token
    rounded to bf16 first as the reference does; and the variant without a position table."""
    inp = unshuffle_inputs(3, 49, 0.75, 72, dtype=torch.bfloat16, device=device)
    inp["mask_token"] = inp["mask_token"].detach().float().requires_grad_()
    inp["pos"] = inp["pos"].detach().float().requires_grad_()
    out = fused.unshuffle(**inp, impl="triton")
    assert out.dtype == torch.float32
    assert torch.equal(out, fused.unshuffle(**inp, impl="torch"))
    assert_matches(_triton, _torch, inp, torch.bfloat16, "unshuffle mixed")
    inp = unshuffle_inputs(3, 49, 0.75, 72, device=device, pos=False)
    assert_matches(_triton, _torch, inp, torch.float32, "unshuffle no pos")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("tiling", [(4, 3), (8, 1), (2, 30)], ids=str)
def test_unshuffle_backward_multi_tile_loop(device, tiling, monkeypatch):
    """GPU-style backward: programs loop over row tiles of one sample (ragged chunk ends, prefetch),
    one partial row of the mask-token gradient per program."""
    from usp_scale.kernels import decoder_unshuffle

    monkeypatch.setattr(decoder_unshuffle, "BWD_TILING_OVERRIDE", tiling)
    inp = unshuffle_inputs(3, 49, 0.75, 72, device=device)
    assert_matches(_triton, _torch, inp, torch.float32, f"unshuffle tiling {tiling}",
                   expect_grads=["x", "mask_token", "pos"])
