"""Fixed 2-D sin-cos position tables (MAE/DiT) and their bicubic resampling.

Layout of a table for a G x G grid and width D (tokens row-major, token = row * G + col):
the first D/2 channels encode the column index, the last D/2 the row index, and each half is
[sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (D/4)). Computed in float64 as the
official code does (it patches np.float32 to float), then stored as float32.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) table [sin | cos]."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """(G*G [+1], D) float64 table; with ``cls_token`` a zero row is prepended."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    gh = np.arange(grid_size, dtype=np.float64)
    gw = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(gw, gh), axis=0)  # grid[0]: column index, grid[1]: row index
    emb = np.concatenate([sincos_1d(embed_dim // 2, grid[0]), sincos_1d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def fill_sincos_(table: torch.Tensor, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """Fill a (1, T, D) parameter in place with the sin-cos table (works on the meta device)."""
    value = torch.from_numpy(sincos_2d(table.shape[-1], grid_size, cls_token)).float().unsqueeze(0)
    if table.shape != value.shape:
        raise ValueError(f"position table of shape {tuple(table.shape)} does not fit grid {grid_size} "
                         f"(expected {tuple(value.shape)})")
    if table.device.type != "meta":
        with torch.no_grad():
            table.copy_(value)
    return table


def resample_grid(table: torch.Tensor, new_grid: int, num_prefix: int = 0, antialias: bool = False) -> torch.Tensor:
    """Resize a (1, prefix + G*G, D) table to new_grid x new_grid, bicubic, align_corners=False.

    The prefix (cls) rows are dropped. Interpolation runs in fp32 on the row-major [D, G, G]
    grid with PyTorch's bicubic (a = -0.75, half-pixel, clamped borders, no antialias): the
    transform the official USP code applies when moving a 14x14 table to a 16x16 DiT.
    ``antialias=True``: timm's ``resample_abs_pos_embed`` default, which REPA applies to its teacher's table.
    """
    grid_tokens = table[:, num_prefix:]
    n = grid_tokens.shape[1]
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"position table has {n} grid tokens, not a square grid")
    if g == new_grid:
        return grid_tokens.clone()
    d = grid_tokens.shape[-1]
    x = grid_tokens.float().reshape(1, g, g, d).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=antialias)
    return x.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d).to(table.dtype)
