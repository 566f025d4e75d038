"""RMSNorm as LightningDiT uses it (norm1, norm2, the final norm, optional QK-norm): Llama's definition.

y = (x / sqrt(mean(x^2 over the last axis) + eps)) * weight, the normalisation computed in fp32 and cast back to
x's dtype *before* the multiplication by ``weight`` (so under autocast the product follows type promotion), eps 1e-6,
weight initialised to ones. Key: ``weight``. (The reference upcasts with ``x.float()``, which would also round fp64
inputs to fp32; fp64 inputs stay fp64 here, the only difference, so checks can run in fp64.)
"""
from __future__ import annotations

import torch
import torch.nn as nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The reference: normalise in fp32, cast back to x's dtype, multiply by ``weight``."""
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
