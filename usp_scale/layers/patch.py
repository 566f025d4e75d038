"""Patch embedding and (un)patchify in the official (h, w, p, q, c) order."""
from __future__ import annotations

import torch
import torch.nn as nn


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C); token = row * W/p + col, value index (pi * p + qi) * C + c."""
    N, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"input {H}x{W} is not divisible by patch size {p}")
    h, w = H // p, W // p
    x = x.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W), the inverse of :func:`patchify` for a square grid."""
    N, L, _ = x.shape
    h = w = int(round(L ** 0.5))
    if h * w != L:
        raise ValueError(f"{L} tokens do not form a square grid")
    x = x.reshape(N, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, channels, h * p, w * p)


class PatchEmbed(nn.Module):
    """Conv2d(kernel = stride = patch) + flatten, with timm's ``proj`` key."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, L, D)
