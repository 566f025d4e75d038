"""Availability checks for the Triton kernels (importable without triton)."""
from __future__ import annotations

import importlib.util

from typing import Optional

import torch

from ._common import interpreting

IMPLS = ("auto", "triton", "torch")


_TRITON_PRESENT = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when triton is installed (it is not imported here)."""
    return _TRITON_PRESENT


def triton_usable(device: torch.device) -> bool:
    """Kernels can run on this device: CUDA with triton, or CPU under TRITON_INTERPRET=1."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if not _TRITON_PRESENT:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreting()


# Ops whose Triton kernel beat eager torch end to end (forward + backward) in the kernel benchmark
# (benchmarks/reports/kernels_h200_2026-11-26.md); for the others (embed_visible_patches, masked_latent_loss) "auto"
# keeps the torch reference; "triton" forces every kernel.
AUTO_TRITON_OPS = frozenset({"layernorm_modulate", "gated_residual", "unshuffle"})


def resolve_impl(mode: str, device, op: Optional[str] = None) -> str:
    """``kernels`` setting -> "triton" or "torch". "auto" is Triton on CUDA only, only for the ops in
    :data:`AUTO_TRITON_OPS` when ``op`` is named, and only in eager mode: while torch.compile traces, "auto"
    gives the torch reference, which Inductor fuses with its neighbours (our kernels are opaque custom ops
    there: they block that fusion, and the compiled reference was level with or ahead of them in
    benchmarks/reports/kernels_h200_2026-11-26.md). "triton" forces the kernels, compiled or not, and must be usable."""
    if mode not in IMPLS:
        raise ValueError(f"model.kernels must be one of {IMPLS}, got {mode!r}")
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if mode == "torch":
        return "torch"
    usable = triton_usable(device)
    if mode == "auto":
        if (op is not None and op not in AUTO_TRITON_OPS) or torch.compiler.is_compiling():
            return "torch"
        return "triton" if usable and device.type == "cuda" else "torch"
    if not usable:
        why = ("triton is not installed (pip install triton)" if not triton_available() else
               f"device {device} is neither CUDA nor a CPU under TRITON_INTERPRET=1")
        raise RuntimeError(f"model.kernels=triton cannot run: {why}; use model.kernels=torch or auto")
    return "triton"

