"""Fused Triton kernels: the top-level folder ``kernels/``, installed as ``usp_scale.kernels`` (see setup.py).

Each kernel module holds the ``@triton.jit`` kernels, an ``autograd.Function`` and a functional
wrapper; the torch references live in ``usp_scale.layers`` and ``usp_scale.layers.fused`` selects
between them (``kernels: auto|triton|torch``). In eager mode the autograd Functions launch the kernels
directly (no dispatcher round-trip per call); while torch.compile traces, the same launch functions run
as ``torch.library`` custom ops (namespace ``usp_scale_kernels``, see ``_common.opaque_op``), so compiled
graphs treat them as opaque calls (fullgraph works).
This package imports without triton: the kernel functions below are loaded on first use.

``python -m usp_scale.kernels.compile_check --arch 90`` compiles every kernel for a GPU without one.
"""
from __future__ import annotations

import importlib

if __name__ != "usp_scale.kernels":  # the bare name belongs to the unrelated PyPI package (and diffusers' probe)
    raise ImportError(f"the kernels folder is the package usp_scale.kernels, not {__name__!r}: import "
                      "usp_scale.kernels (pip install the repository, or run from its root: usp_scale maps it)")

from .dispatch import IMPLS, resolve_impl, triton_available, triton_usable

_LAZY = {
    "embed_visible_patches": "patch_embed",
    "gather_patches": "patch_embed",
    "unshuffle": "decoder_unshuffle",
    "masked_latent_loss": "masked_loss",
    "layernorm_modulate": "adaln",
    "gated_residual": "adaln",
}

__all__ = ["IMPLS", "resolve_impl", "triton_available", "triton_usable", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(mod, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
