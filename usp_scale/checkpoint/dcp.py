"""The checkpoint I/O of the DCP engines (local, ddp, fsdp2): model, optimizer (and GradScaler) and the EMA through
``torch.distributed.checkpoint``, so a checkpoint resumes on another world size or another of these engines (DCP
reshards). One stateful part of a run, handed to :class:`~usp_scale.checkpoint.manager.CheckpointManager` beside the
EMA and the trainer's host states; DeepSpeed has its own (:class:`usp_scale.engine.deepspeed.state.DeepSpeedState`).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional

import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .. import runtime as D
from .safe_load import dcp_load


@contextlib.contextmanager
def _single_process_dcp():
    """DCP without a process group (the local engine) warns on every call that it works in one process: it does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class DCPState:
    """``model`` (as the engine wraps it: plain, DDP or FSDP2), its ``optimizer`` and, under fp16, the GradScaler
    ``scaler``, saved into ``<path>/dcp`` with the EMA tensors the trainer hands over."""

    format = "dcp"  # checkpoint meta.json "checkpoint_format": DCP checkpoints reshard between the DCP engines
    config = None   # no engine-owned config file (DeepSpeed's JSON is one)

    def __init__(self, model: nn.Module, optimizer, scaler=None):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler

    def state_dict(self) -> dict:
        """Model and optimizer through ``torch.distributed.checkpoint.state_dict`` (keys are parameter names, no
        wrapper prefixes; FSDP2 gives DTensor shards), plus the GradScaler's state under fp16. DCP saves it from
        any engine of the DCP family (local, ddp, fsdp2) and loads it into any of them, on any world size."""
        # Before the first applied step the optimizer has no state, and get_state_dict creates it with a zero-lr
        # step (Adam's step count becomes 1): the live optimizer is put back as it was, and the checkpoint says so.
        fresh = not self.optimizer.state
        msd, osd = get_state_dict(self.model, self.optimizer)
        if fresh:
            self.optimizer.state.clear()
        sd = {"model": msd, "optimizer": osd, "optimizer_fresh": fresh}
        if self.scaler is not None:
            sd["scaler"] = self.scaler.state_dict()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        if sd.get("optimizer_fresh"):  # saved before any applied step: its first real step initialises the state
            self.optimizer.state.clear()
        if self.scaler is not None:
            if "scaler" not in sd:
                raise KeyError("the checkpoint has no GradScaler state but this run trains in fp16: resume with the "
                               "engine.precision it was saved with")
            self.scaler.load_state_dict(sd["scaler"])

    def save(self, path: str, ema_state: Optional[dict] = None) -> None:
        """Collective: write :meth:`state_dict` and the EMA tensors (``ema_state``, the engine's layout) with DCP
        into folder ``path/dcp``; each rank writes its shards, replicated tensors are written once."""
        state = self.state_dict()
        if ema_state is not None:
            state["ema"] = dict(ema_state)
        with _single_process_dcp():
            dcp.save(state, checkpoint_id=os.path.join(path, "dcp"))
        D.barrier()

    def load(self, path: str, ema_state: Optional[dict] = None) -> None:
        """Collective: load what :meth:`save` wrote (from any world size and DCP engine, resharded by DCP); EMA
        tensors are loaded into ``ema_state`` in place. Nothing is unpickled but plain values
        (:func:`~usp_scale.checkpoint.safe_load.dcp_load`)."""
        state = self.state_dict()
        if ema_state is not None:
            state["ema"] = dict(ema_state)
        with _single_process_dcp():
            dcp_load(state, os.path.join(path, "dcp"))
        self.load_state_dict(state)
