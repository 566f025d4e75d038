"""fp32 exponential moving average of model parameters (DiT: decay 0.9999 after every step).

The EMA follows the tensors an engine exposes (full parameters, FSDP2 DTensor shards, DeepSpeed
ZeRO-3 local fp32 partitions, or under ZeRO-1/2 bf16 this rank's fragments of the fp32 masters);
the engine gathers them for export.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch.distributed.tensor.experimental import implicit_replication


class EMA:
    def __init__(self, sources: List[Tuple[str, torch.Tensor]], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {decay}")
        self.decay = decay
        # name -> fp32 tensor with the same layout (and device) as its source
        self.shadow: Dict[str, torch.Tensor] = {n: t.detach().float().clone() for n, t in sources}

    @torch.no_grad()
    def update(self, sources: List[Tuple[str, torch.Tensor]], gate: Optional[torch.Tensor] = None) -> None:
        """ema <- decay * ema + (1 - decay) * theta, written as a lerp towards theta.

        ``gate``: a 0-dim bool tensor on the device (the step's ``StepResult.ok``); where False the EMA is left
        unchanged, decided on the device without a host sync.
        """
        if gate is None:
            shadow = [self.shadow[n] for n, _ in sources]
            torch._foreach_lerp_(shadow, [t.detach().float() for _, t in sources], 1.0 - self.decay)
            return
        w = gate.to(torch.float32) * (1.0 - self.decay)                # 0-dim, on the device
        # A Python-scalar weight would need w on the host; lerp with a 0-dim tensor weight does not.
        shadow = [self.shadow[n] for n, _ in sources]
        srcs = [t.detach().float() for _, t in sources]
        if any(type(e) is not torch.Tensor for e in shadow):
            # FSDP2 shards are DTensors: the plain 0-dim weight joins them as a replicated value, one at a time.
            with implicit_replication():
                for e, t in zip(shadow, srcs):
                    e.lerp_(t, w if w.device == e.device else w.to(e.device))
            return
        # one call for all tensors (the same per-tensor lerp, without a Python loop per parameter)
        torch._foreach_lerp_(shadow, srcs, [w if w.device == e.device else w.to(e.device) for e in shadow])

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """name -> fp32 tensor in the engine's layout (the live tensors: DCP loads into them in place)."""
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        """Copy ``sd`` into the shadow tensors in place; every name must be present with the same shape."""
        bad = [f"{k}: {'missing' if k not in sd else tuple(sd[k].shape)} vs {tuple(v.shape)}"
               for k, v in self.shadow.items() if k not in sd or tuple(sd[k].shape) != tuple(v.shape)]
        if bad:
            raise KeyError("EMA state does not match this model's EMA (name: saved vs now):\n  " + "\n  ".join(bad))
        for k, v in self.shadow.items():
            if sd[k] is not v:
                v.copy_(sd[k])
