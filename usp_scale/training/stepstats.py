"""Per-step scalars read on the host one step late, so the device never waits for the CPU.

Each optimizer step leaves a few 0-dim device tensors (applied?, grad norm). Reading them with ``float()``
right away would stall the CPU until the GPU has finished the step, and the GPU would then idle until the
CPU has launched the next one. Instead they are packed into one small tensor, copied to pinned host memory
with ``non_blocking=True`` behind a CUDA event, and handed back only when a newer step has been queued
(or at :meth:`DeferredStepStats.flush`, which the trainer calls before logging and checkpointing). On the
CPU the copy is synchronous and the same code runs, so the tests exercise it.
"""
from __future__ import annotations

import collections
from typing import Any, Deque, Iterator, List, Optional, Tuple

import torch


class DeferredStepStats:
    def __init__(self, device: torch.device, lag: int = 1):
        if lag < 0:
            raise ValueError(f"lag must be >= 0, got {lag}")
        self.device = device
        self.lag = lag
        self._cuda = device.type == "cuda"
        # (step, host tensor, event or None, meta)
        self._pending: Deque[Tuple[int, torch.Tensor, Optional["torch.cuda.Event"], Any]] = collections.deque()

    def push(self, step: int, *values: torch.Tensor, meta: Any = None) -> None:
        """Queue the 0-dim device tensors ``values`` of optimizer step ``step`` (read back as floats) and a
        host object ``meta`` returned with them."""
        packed = torch.stack([v.detach().reshape(()).to(torch.float64) for v in values])
        if self._cuda:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._pending.append((step, host, ev, meta))
        else:
            self._pending.append((step, packed.cpu(), None, meta))

    def _pop(self, keep: int) -> Iterator[Tuple[int, List[float], Any]]:
        while len(self._pending) > keep:
            step, host, ev, meta = self._pending.popleft()
            if ev is not None:
                ev.synchronize()
            yield step, host.tolist(), meta

    def ready(self) -> Iterator[Tuple[int, List[float], Any]]:
        """(step, values, meta) of every queued step except the newest ``lag`` ones, oldest first."""
        return self._pop(self.lag)

    def flush(self) -> Iterator[Tuple[int, List[float], Any]]:
        """(step, values, meta) of every queued step (waits for the device)."""
        return self._pop(0)

    def __len__(self) -> int:
        return len(self._pending)
