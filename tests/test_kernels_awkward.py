"""Every Triton kernel at awkward sizes: widths that are not multiples of 8 (primes, 1), odd channel counts and
patch vectors, prime token counts, a batch of one. The other kernel tests use the model widths (multiples of 8);
masking and padding bugs show up here. Small grids, so the CPU interpreter stays fast."""
import pytest
import torch

from _helpers_kernels import DTYPES, assert_matches, embed_inputs, gated_inputs, kernel_devices, ln_mod_inputs, \
    loss_inputs, unshuffle_inputs
from usp_scale.layers import fused
from usp_scale.layers.masking import gather_tokens
from usp_scale.layers.patch import patchify


def _both(op):
    fn = getattr(fused, op)
    return (lambda **kw: fn(**kw, impl="triton")), (lambda **kw: fn(**kw, impl="torch"))


WIDTHS = [3, 7, 37, 131]                     # D: primes below and above one 32/64/128 block (D = 1: LN is 0)
TOKENS = [(1, 13), (3, 5), (2, 97)]          # (N, T): a batch of one, prime token counts


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", WIDTHS)
@pytest.mark.parametrize("NT", TOKENS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layernorm_modulate_and_gated_residual(device, dtype, D, NT):
    N, T = NT
    for affine in (True, False):
        inp = ln_mod_inputs(N, T, D, affine=affine, dtype=dtype, device=device)
        grads = ["x", "shift", "scale"] + (["weight", "bias"] if affine else [])
        assert_matches(*_both("layernorm_modulate"), inp, dtype, f"ln_mod {N}x{T}x{D} {affine}", expect_grads=grads)
    inp = gated_inputs(N, T, D, dtype=dtype, device=device)
    assert_matches(*_both("gated_residual"), inp, dtype, f"gated {N}x{T}x{D}", expect_grads=["x", "gate", "y"])


UNSHUFFLE = [(1, 13, 0.75, 7), (3, 23, 0.5, 37), (2, 29, 0.9, 131), (2, 5, 0.2, 1)]   # (N, L, ratio, D)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", UNSHUFFLE, ids=lambda s: f"{s[0]}x{s[1]}x{s[3]}")
def test_unshuffle(device, dtype, shape):
    N, L, ratio, D = shape
    for pos in (True, False):
        inp = unshuffle_inputs(N, L, ratio, D, dtype=dtype, device=device, pos=pos)
        assert_matches(*_both("unshuffle"), inp, dtype, f"unshuffle {shape} pos={pos}",
                       expect_grads=["x", "mask_token"] + (["pos"] if pos else []))


# (N, C, img, patch, D, ratio, bias): odd channel counts give patch vectors of 3, 5, 7, 20, 27 values;
# 5x5, 7x7, 3x3 and 2x2 grids; embedding widths 1, 7, 37, 131.
EMBED = [(1, 3, 10, 2, 7, 0.75, True), (3, 5, 10, 2, 37, 0.6, False), (2, 7, 7, 1, 131, 0.5, True),
         (2, 3, 9, 3, 1, 0.5, True), (3, 5, 4, 2, 13, 0.5, True)]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", EMBED, ids=lambda s: "x".join(map(str, s[:5])))
def test_embed_visible_patches_and_gather(device, dtype, shape):
    N, C, img, p, D, ratio, bias = shape
    inp = embed_inputs(N, C, img, p, D, ratio, bias, dtype=dtype, device=device)
    assert_matches(*_both("embed_visible_patches"), inp, dtype, f"embed {shape}",
                   expect_grads=["latents", "weight"] + (["bias"] if bias else []))
    from usp_scale.kernels import gather_patches

    lat = inp["latents"].detach()
    assert torch.equal(gather_patches(lat, inp["ids_keep"], p), gather_tokens(patchify(lat, p), inp["ids_keep"]))


# (N, C, img, patch, ratio): patch vectors of 3, 7, 20, 27 values, 5x5 / 7x7 / 3x3 grids, one kept token.
LOSS = [(1, 3, 10, 2, 0.75), (3, 7, 7, 1, 0.5), (2, 5, 10, 2, 0.9), (2, 3, 9, 3, 0.6)]
NORMS = [(True, False), (True, True), (False, False)]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS, ids=["per_patch", "per_image", "plain"])
@pytest.mark.parametrize("shape", LOSS, ids=lambda s: "x".join(map(str, s[:4])))
def test_masked_latent_loss(device, dtype, norm, shape):
    N, C, img, p, ratio = shape
    inp = loss_inputs(N, C, img, p, ratio, *norm, dtype=dtype, device=device)
    assert_matches(*_both("masked_latent_loss"), inp, dtype, f"loss {shape} {norm}", expect_grads=["pred"])


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("tiling", [(4, 3), (2, 7)], ids=str)
def test_backward_multi_tile_loops_at_awkward_sizes(device, tiling, monkeypatch):
    """The GPU tiling (programs looping over row tiles, ragged chunk ends) with a prime width and token count."""
    from usp_scale.kernels import adaln, decoder_unshuffle

    monkeypatch.setattr(adaln, "BWD_TILING_OVERRIDE", tiling)
    monkeypatch.setattr(decoder_unshuffle, "BWD_TILING_OVERRIDE", tiling)
    f32 = torch.float32
    assert_matches(*_both("layernorm_modulate"), ln_mod_inputs(3, 97, 37, device=device), f32, f"ln_mod {tiling}",
                   expect_grads=["x", "weight", "bias", "shift", "scale"])
    assert_matches(*_both("gated_residual"), gated_inputs(3, 97, 37, device=device), f32, f"gated {tiling}",
                   expect_grads=["x", "gate", "y"])
    assert_matches(*_both("unshuffle"), unshuffle_inputs(3, 29, 0.75, 37, device=device), f32,
                   f"unshuffle {tiling}", expect_grads=["x", "mask_token", "pos"])
