"""MAE random masking (argsort of noise) and the decoder unshuffle, as torch references."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    return int(num_tokens * (1 - mask_ratio))


def masking_indices(noise: torch.Tensor, len_keep: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """noise (N, L) -> ids_keep (N, len_keep), ids_restore (N, L), mask (N, L; 1 = removed).

    Small noise is kept: the official ``argsort`` of per-sample uniform noise.
    """
    N, L = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(N, L, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (N, L, D), ids (N, K) -> (N, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def draw_mask(n: int, num_tokens: int, mask_ratio: float, noise: Optional[torch.Tensor] = None, device=None
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MAE's random masking, the one function: keep ``int(L * (1 - ratio))`` of ``num_tokens`` tokens per sample
    by the argsort of ``noise`` (N, L) (uniform noise drawn here when None). Returns ids_keep (N, K), ids_restore
    (N, L), mask (N, L; 1 = removed)."""
    if noise is None:
        noise = torch.rand(n, num_tokens, device=device)
    elif noise.shape != (n, num_tokens):
        raise ValueError(f"noise must have shape {(n, num_tokens)}, got {tuple(noise.shape)}")
    return masking_indices(noise, num_kept(num_tokens, mask_ratio))


def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
    """The official ``random_masking`` on tokens x (N, L, D) (:func:`draw_mask`). Returns x_kept, mask, ids_restore,
    ids_keep."""
    N, L, _ = x.shape
    ids_keep, ids_restore, mask = draw_mask(N, L, mask_ratio, noise, x.device)
    return gather_tokens(x, ids_keep), mask, ids_restore, ids_keep


def unshuffle_with_mask_tokens(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                               pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decoder input: x (N, 1 + K, D) visible tokens with cls first, mask_token (1, 1, D),
    ids_restore (N, L) -> (N, 1 + L, D) in the original order, plus ``pos_embed`` (1, 1 + L, D)."""
    N, _, D = x.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.to(x.dtype).expand(N, L + 1 - x.shape[1], D)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = gather_tokens(x_, ids_restore)
    x = torch.cat([x[:, :1, :], x_], dim=1)
    if pos_embed is not None:
        x = x + pos_embed
    return x
