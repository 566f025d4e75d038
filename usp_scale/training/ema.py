"""fp32 exponential moving average of model parameters (DiT: decay 0.9999 after every step).

The EMA follows the tensors an engine exposes (full parameters, FSDP2 DTensor shards, DeepSpeed
ZeRO-3 local fp32 partitions, or under ZeRO-1/2 bf16 this rank's fragments of the fp32 masters);
the engine gathers them for export.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch


class EMA:
    def __init__(self, sources: List[Tuple[str, torch.Tensor]], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {decay}")
        self.decay = decay
        # name -> fp32 tensor with the same layout (and device) as its source
        self.shadow: Dict[str, torch.Tensor] = {n: t.detach().float().clone() for n, t in sources}

    @torch.no_grad()
    def update(self, sources: List[Tuple[str, torch.Tensor]]) -> None:
        """ema <- decay * ema + (1 - decay) * theta."""
        for n, t in sources:
            e = self.shadow[n]
            e.mul_(self.decay).add_(t.detach().float(), alpha=1.0 - self.decay)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.shadow
