"""2-D rotary position embedding (EVA-02's ``VisionRotaryEmbeddingFast``, LightningDiT's ``feat_rope``) and the
attention that applies it (with optional QK-norm) before the project's attention kernel.

Table for a G x G token grid (tokens row-major, token = row * G + col) and head dim d (d % 4 == 0): with
a = d / 2 channels per axis and the a / 2 frequencies w_k = theta^(-2k / a) (theta 10000), a position p on an
axis gives the a angles [p w_0, p w_0, p w_1, p w_1, ...] (each frequency twice, for one channel pair); a token's
d angles are those of its row followed by those of its column. Positions are ``arange(G) / G * pt_grid``
(``pt_grid`` = G unless the table was made for a finer grid than the one trained on, EVA's ``ft_seq_len``).
``freqs_cos`` / ``freqs_sin`` (G*G, d) are persistent buffers, as in LightningDiT's state dict, computed in fp32
exactly as EVA does. Rotation of a channel pair (x_2i, x_2i+1): x * cos + rotate_half(x) * sin with
rotate_half(x)_(2i, 2i+1) = (-x_2i+1, x_2i). A loaded table is checked against the one this grid gives: a table
made for another grid (or theta) is an error naming the key.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from .attention import Attention
from .rmsnorm import RMSNorm

Rope = Tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each broadcastable to (B, N, H, d)


def rope_angles(head_dim: int, grid: int, pt_grid: Optional[int] = None, theta: float = 10000.0) -> torch.Tensor:
    """(grid * grid, head_dim) angles of the 2-D table (fp32, EVA's arithmetic)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4 (two axes of channel pairs), got {head_dim}")
    a = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, a, 2)[: a // 2].float() / a))           # (a/2,)
    pos = torch.arange(grid) / grid * (pt_grid or grid)                                # (G,)
    per_axis = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)            # (G, a): pairs share a freq
    rows = per_axis[:, None, :].expand(grid, grid, a)
    cols = per_axis[None, :, :].expand(grid, grid, a)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d): each channel pair (x0, x1) -> (-x1, x0)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, returned in x's dtype (cos/sin broadcast over x's leading axes)."""
    cos, sin = rope
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class VisionRotaryEmbedding(nn.Module):
    """The fixed 2-D table of a G x G grid (keys ``freqs_cos``, ``freqs_sin``)."""

    def __init__(self, head_dim: int, grid: int, pt_grid: Optional[int] = None, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.grid, self.pt_grid, self.theta = head_dim, grid, pt_grid or grid, theta
        angles = rope_angles(head_dim, grid, pt_grid, theta)
        self.register_buffer("freqs_cos", angles.cos())
        self.register_buffer("freqs_sin", angles.sin())

    def reset_tables(self) -> None:
        """Recompute the tables in place (after a build on the meta device and ``to_empty``)."""
        angles = rope_angles(self.head_dim, self.grid, self.pt_grid, self.theta).to(self.freqs_cos.device)
        with torch.no_grad():
            self.freqs_cos.copy_(angles.cos())
            self.freqs_sin.copy_(angles.sin())

    def tables(self, positions: Optional[torch.Tensor] = None) -> Rope:
        """(cos, sin) for every token, (N, 1, d) each, or for the tokens ``positions`` (B, K): (B, K, 1, d)."""
        cos, sin = self.freqs_cos, self.freqs_sin
        if positions is not None:
            cos, sin = cos[positions], sin[positions]
        return cos.unsqueeze(-2), sin.unsqueeze(-2)

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, N, H, d) (all G*G tokens in order, or the tokens ``positions`` (B, N)) -> rotated x."""
        if positions is None and x.shape[1] != self.freqs_cos.shape[0]:
            raise ValueError(f"RoPE table of a {self.grid}x{self.grid} grid applied to {x.shape[1]} tokens")
        return apply_rope(x, self.tables(positions))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        expected = rope_angles(self.head_dim, self.grid, self.pt_grid, self.theta)
        for name, fn in (("freqs_cos", torch.cos), ("freqs_sin", torch.sin)):
            v = state_dict.get(prefix + name)
            if v is None or v.device.type == "meta":
                continue
            want = fn(expected)
            if tuple(v.shape) != tuple(want.shape):
                error_msgs.append(f"{prefix}{name}: a RoPE table of shape {tuple(v.shape)}, this model's "
                                  f"{self.grid}x{self.grid} grid with head dim {self.head_dim} needs "
                                  f"{tuple(want.shape)} (a table for another grid or head dim)")
            elif not torch.allclose(v.float().cpu(), want, atol=1e-5, rtol=0):
                error_msgs.append(f"{prefix}{name}: the RoPE table differs from the one of a {self.grid}x{self.grid} "
                                  f"grid (theta {self.theta:g}, positions 0..{self.grid - 1}) by up to "
                                  f"{(v.float().cpu() - want).abs().max().item():.3g}: made for another grid")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, grid={self.grid}, pt_grid={self.pt_grid}, theta={self.theta:g}"


class RoPEAttention(Attention):
    """:class:`~usp_scale.layers.attention.Attention` (keys ``qkv``, ``proj``) with optional QK-norm (keys
    ``q_norm``, ``k_norm``: RMSNorm, or LayerNorm when ``rmsnorm=False``, over the head dim) and 2-D RoPE applied
    to q and k in its ``transform_qkv`` hook; the attention itself runs the project's configured kernel."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 rmsnorm: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias)
        norm = (lambda: RMSNorm(self.head_dim)) if rmsnorm else (lambda: nn.LayerNorm(self.head_dim))
        self.q_norm = norm() if qk_norm else nn.Identity()
        self.k_norm = norm() if qk_norm else nn.Identity()

    def transform_qkv(self, qkv: torch.Tensor, rope: Optional[Rope] = None) -> torch.Tensor:
        q, k, v = qkv.unbind(2)                                              # each (B, N, H, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return torch.stack((q, k.to(q.dtype), v.to(q.dtype)), dim=2)
