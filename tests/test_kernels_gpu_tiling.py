"""Run every kernel with the tile sizes and grids it would use on a GPU (smaller tiles, more programs,
looping backward) under the interpreter, so the GPU launch configuration is checked on the CPU too."""
import pytest
import torch

from _helpers_kernels import (assert_matches, embed_inputs, gated_inputs, kernel_devices, ln_mod_inputs,
                              loss_inputs, unshuffle_inputs)
from usp_scale.layers import fused


@pytest.fixture
def gpu_tiling(monkeypatch):
    from usp_scale.kernels import _common

    monkeypatch.setattr(_common, "_INTERPRET", False)     # tiling helpers now pick their GPU sizes


def _pair(name):
    op = getattr(fused, name)
    return (lambda **kw: op(**kw, impl="triton")), (lambda **kw: op(**kw, impl="torch"))


CASES = {
    "embed_visible_patches": lambda dev: embed_inputs(3, 4, 14, 2, 72, 0.75, device=dev),
    "unshuffle": lambda dev: unshuffle_inputs(3, 49, 0.75, 72, device=dev),
    "masked_latent_loss": lambda dev: loss_inputs(3, 4, 14, 2, 0.75, device=dev),
    "layernorm_modulate": lambda dev: ln_mod_inputs(3, 49, 72, affine=True, device=dev),
    "gated_residual": lambda dev: gated_inputs(3, 49, 72, device=dev),
}


@pytest.mark.parametrize("device", kernel_devices()[:1])
@pytest.mark.parametrize("op", list(CASES))
def test_gpu_tiling_under_interpreter(device, op, gpu_tiling):
    fast, ref = _pair(op)
    assert_matches(fast, ref, CASES[op](device), torch.float32, f"{op} with GPU tiling")


# Shapes that make the GPU tiling loop: per-image stats over 4*28*28 > 2048 values (two chunks), several
# loss programs per sample; embed with 16 row-tiles x 2 feature blocks and a dpos loop over 2 sample blocks.
LOOP_CASES = {
    "masked_latent_loss_per_image": ("masked_latent_loss", lambda dev: loss_inputs(3, 4, 28, 2, 0.75, True, True,
                                                                                   device=dev)),
    "embed_visible_patches_tiles": ("embed_visible_patches", lambda dev: embed_inputs(5, 4, 28, 2, 200, 0.75,
                                                                                      device=dev)),
}


@pytest.mark.parametrize("device", kernel_devices()[:1])
@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_gpu_tiling_loops_under_interpreter(device, case, gpu_tiling):
    op, make = LOOP_CASES[case]
    fast, ref = _pair(op)
    assert_matches(fast, ref, make(device), torch.float32, f"{case} with GPU tiling")
