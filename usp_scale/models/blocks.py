"""Transformer blocks shared by the autoencoder and the classifier (timm ``Block`` key layout)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers.attention import Attention
from ..layers.mlp import DropPath, Mlp
from .contract import CheckpointBlock


class Block(CheckpointBlock):
    """Pre-LN ViT block: x + attn(norm1(x)), then x + mlp(norm2(x)); LayerNorm eps 1e-6, exact GELU."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, approximate_gelu: str = "none"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate=approximate_gelu)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def block_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def vit_block_macs(dim: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    """Multiply-accumulates of one block's matmuls for one sample (attention scores included)."""
    hidden = int(dim * mlp_ratio)
    linear = tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)
    attn = 2 * tokens * tokens * dim
    return float(linear + attn)


def init_linear_xavier(module: nn.Module) -> None:
    """Official init: xavier-uniform for every Linear (bias 0); LayerNorm weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
