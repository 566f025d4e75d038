"""REPA's alignment loss (sihyun-yu/REPA loss.py ``SILoss``; docs/method.md §9).

For teacher tokens y (N, T, D) and projected model tokens h (N, T, D), per sample n::

    proj_loss[n] = mean over teachers of  -(1/T) sum_t  cos(y[n, t], h[n, t])

REPA's scalar is ``proj_loss.mean()`` (its ``/= len(zs) * bsz``), and the training loss is
``diffusion_loss + proj_coeff * proj_loss`` with ``proj_coeff`` 0.5. The normalisation runs in **fp32** whatever
the inputs' dtype: REPA issue #46 saw fp16 runs reach NaN after 70-160K steps until ``F.normalize`` ran in fp32.
The teacher tokens carry no gradient (they are detached here; the teacher is frozen anyway).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def projection_loss(targets: Sequence[torch.Tensor], projected: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample REPA loss (N,) in fp32: -cos averaged over tokens and teachers.

    ``targets``: per teacher (N, T, D) teacher patch tokens; ``projected``: per teacher (N, T, D) projector
    outputs (the model's ``zs``). Shapes must agree teacher by teacher (the token counts included)."""
    if len(targets) != len(projected) or not targets:
        raise ValueError(f"REPA loss: {len(targets)} teacher token sets for {len(projected)} projectors; "
                         "the model needs one projector per teacher (z_dims)")
    per_teacher = []
    for i, (y, h) in enumerate(zip(targets, projected)):
        if y.shape != h.shape:
            raise ValueError(f"REPA loss: teacher {i} gives tokens of shape {tuple(y.shape)} (N, T, D), its "
                             f"projector {tuple(h.shape)}: the token count T and width D must match")
        y = F.normalize(y.detach().float(), dim=-1)
        h = F.normalize(h.float(), dim=-1)
        per_teacher.append(-(y * h).sum(dim=-1).mean(dim=1))          # (N,)
    return torch.stack(per_teacher).mean(dim=0)


def repa_total_loss(diffusion_loss: torch.Tensor, proj_loss: torch.Tensor, proj_coeff: float = 0.5) -> torch.Tensor:
    """REPA's training loss: ``diffusion_loss + proj_coeff * proj_loss`` (REPA: proj_coeff 0.5)."""
    return diffusion_loss + proj_coeff * proj_loss
