"""adaLN modulation (DiT) as torch references."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (N, T, D), shift/scale (N, D) -> x * (1 + scale) + shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layernorm_modulate(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm (affine when weight/bias are given: the VAE-simple case), then modulate."""
    return modulate(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), shift, scale)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y with gate (N, D) broadcast over tokens."""
    return x + gate.unsqueeze(1) * y
