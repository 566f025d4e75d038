"""The one attention module every model uses.

Multi-head self-attention with a fused qkv projection (timm key layout: ``qkv``, ``proj``).
The core product goes through :func:`attention`, which defaults to
``F.scaled_dot_product_attention``; the backend switch (FlashAttention-3/2, SDPA backends)
plugs in there, so models never pick a backend themselves.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Explicit softmax attention, (B, H, N, d) -> (B, H, N, d), computed in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    attn = (q.float() @ k.float().transpose(-2, -1)) * scale
    return (attn.softmax(dim=-1) @ v.float()).to(q.dtype)


_BACKEND = {"fn": None}


def set_attention_fn(fn) -> None:
    """Install a (q, k, v) -> out function for all attention layers (None restores SDPA)."""
    _BACKEND["fn"] = fn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) non-causal attention through the selected backend."""
    fn = _BACKEND["fn"]
    if fn is not None:
        return fn(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d)
        x = attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))
