"""Classifier-free guidance around a class-conditional model callable ``model(x, t, y)``."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CFGModel:
    """out = uncond + scale * (cond - uncond) on the guided channels, conditional elsewhere.

    * ``guided_channels``: number of leading output channels guided. ``None`` = all latent channels
      (the input's C: for DiT that is eps, the variance channels C..2C stay conditional; for SiT all
      velocity channels). ``3`` reproduces the official ``forward_with_cfg`` (docs/method.md §7, item 10).
    * ``interval``: (low, high) in the model's time units (DiT: original step index 0..999; SiT:
      t in [0, 1]); rows whose t lies outside get the conditional output and, when no row of the
      batch is inside, the unconditional pass is skipped.
    * The null label is ``num_classes`` (the extra row of the label table trained with dropout).
    """

    def __init__(self, model: ModelFn, scale: float, num_classes: int,
                 guided_channels: Optional[int] = None, interval: Optional[Tuple[float, float]] = None):
        if scale < 0:
            raise ValueError(f"cfg scale must be >= 0, got {scale}")
        if interval is not None and not (len(interval) == 2 and interval[0] <= interval[1]):
            raise ValueError(f"guidance interval must be (low, high) with low <= high, got {interval!r}")
        if guided_channels is not None and guided_channels < 1:
            raise ValueError(f"guided_channels must be >= 1, got {guided_channels}")
        self.model, self.scale, self.num_classes = model, float(scale), int(num_classes)
        self.guided_channels, self.interval = guided_channels, interval

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.model(x, t, y)
        if self.interval is None:
            inside = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        else:
            tf = t.float()
            inside = (tf >= self.interval[0]) & (tf <= self.interval[1])
        if not bool(inside.any()):
            return self.model(x, t, y)
        null = torch.full_like(y, self.num_classes)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2N, C', H, W)
        cond, uncond = out.chunk(2, dim=0)
        g = x.shape[1] if self.guided_channels is None else min(self.guided_channels, cond.shape[1])
        guided = uncond[:, :g] + self.scale * (cond[:, :g] - uncond[:, :g])
        res = torch.cat([guided, cond[:, g:]], dim=1)
        if self.interval is not None:
            res = torch.where(inside.view(-1, *([1] * (x.ndim - 1))), res, cond)
        return res
