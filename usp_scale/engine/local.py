"""Single-device and DDP engines."""
from __future__ import annotations

import contextlib

import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint.dcp import DCPState
from .base import Engine, Weights


class LocalEngine(Engine):
    """One device, no wrapper."""

    name = "local"

    def __init__(self, model: nn.Module, optimizer_factory, **kw):
        super().__init__(model, **kw)
        self.optimizer = optimizer_factory(model)
        self.weights = Weights(model, self.optimizer)
        self.state = DCPState(self.model, self.optimizer, self.scaler)


class DDPEngine(Engine):
    """torch DDP; gradients all-reduced in fp32 (``reduce_dtype="fp32"``: the parameters' dtype, no hook) or
    compressed to bf16 for the all-reduce (``"bf16"``: torch's bf16_compress_hook); ``no_sync`` between
    accumulation boundaries."""

    name = "ddp"

    def __init__(self, model: nn.Module, optimizer_factory, *, reduce_dtype: str = "fp32", **kw):
        super().__init__(model, **kw)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # No find_unused_parameters: every trainable parameter is used in each forward.
        self.model = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False,
                                             gradient_as_bucket_view=True)
        self.reduce_dtype = reduce_dtype
        if reduce_dtype == "bf16":
            self.model.register_comm_hook(None, default_hooks.bf16_compress_hook)
        self.optimizer = optimizer_factory(model)
        self.weights = Weights(model, self.optimizer)
        self.state = DCPState(self.model, self.optimizer, self.scaler)

    def sync_context(self):
        if self._is_boundary():
            return contextlib.nullcontext()
        return self.model.no_sync()
