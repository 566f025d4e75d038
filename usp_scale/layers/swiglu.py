"""The SwiGLU feed-forward of LightningDiT (keys ``w12``, ``w3``).

hidden = int(2/3 * int(dim * mlp_ratio)) (3072 at dim 1152, ratio 4: the GELU MLP's FLOPs), one packed input
projection ``w12`` (dim -> 2 * hidden; its first half is the gate), ``silu(gate) * up``, output ``w3``
(hidden -> dim), biases on both. The hidden size is LightningDiT's expression evaluated in Python floats, so
for dims where 2/3 * 4d is not an integer it rounds down (1024 -> 2730).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """LightningDiT's hidden width: ``int(2/3 * int(dim * mlp_ratio))``."""
    return int(2 / 3 * int(dim * mlp_ratio))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)
