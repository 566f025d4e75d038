"""The engine: parallelize + step (the shape of torchtitan's ``parallelize_fn`` and train step), shared by
local / ddp / fsdp2 / deepspeed.

An engine wraps the model once, in its constructor (DDP, ``fully_shard``, ``deepspeed.initialize``), builds the
optimizer over the wrapped parameters through the factory it is given, and then runs, for every micro-batch::

    with engine.sync_context(), engine.autocast():
        loss = task.loss(engine, batch)          # engine(...) runs the wrapped forward
    engine.backward(loss)
    result = engine.step()                        # None between accumulation boundaries

``step()`` applies the optimizer only on accumulation boundaries. It computes the global
gradient norm, clips when asked, and skips the update when the loss or the gradients are not
finite (``StepResult.applied`` is False). A non-finite loss poisons the gradients with NaN
(no host sync per micro-step), so every engine detects it through the gradient norm.

No host synchronisation per step where the optimizer can skip on the device: torch's fused
AdamW/Adam/SGD read a ``found_inf`` tensor and leave parameters, moments and step counts untouched
when it is 1 (the mechanism GradScaler uses). ``StepResult`` then carries device tensors; the trainer
reads them on the host one step later (``DeferredStepStats``), so the GPU never waits for the CPU.
Other optimizers (LARS, apex, foreach AdamW) and fp16 with a GradScaler decide on the host.

Everything else about the wrapped model is one of two parts the engine hands out, each the same interface on
every engine: ``engine.weights`` (:class:`Weights`: the tensors the EMA follows in this engine's layout, and the
full gathered model, EMA and optimizer state for exports and evaluation) and ``engine.state`` (the checkpoint I/O
of model, optimizer and EMA: :class:`usp_scale.checkpoint.dcp.DCPState`, or DeepSpeed's own files).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn


@dataclass
class StepResult:
    """Outcome of one optimizer step, as 0-dim tensors on the training device (no host sync made)."""

    # True when the optimizer update was applied (False: non-finite loss/gradients, skipped). bool tensor.
    ok: torch.Tensor
    # Global L2 norm of the gradients before clipping (inf/nan when non-finite). fp32 tensor.
    norm: torch.Tensor

    @classmethod
    def from_host(cls, applied: bool, grad_norm: float, device=None) -> "StepResult":
        return cls(ok=torch.tensor(bool(applied), device=device),
                   norm=torch.tensor(float(grad_norm), dtype=torch.float32, device=device))

    @property
    def applied(self) -> bool:
        """Host bool (synchronises with the device)."""
        return bool(self.ok)

    @property
    def grad_norm(self) -> float:
        """Host float (synchronises with the device)."""
        return float(self.norm)


def device_precision(precision: str, device: torch.device) -> str:
    """The autocast precision on ``device``: "auto" -> bf16 on a GPU, fp32 on a CPU; fp32/bf16/fp16 as they are
    ("official" was resolved per task at start-up, :func:`usp_scale.config.resolve.resolve_job`)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """Return ``loss`` unchanged when finite; otherwise a loss whose gradients are all NaN."""
    ok = torch.isfinite(loss.detach())
    return loss * torch.where(ok, torch.ones_like(loss), torch.full_like(loss, float("nan")))


def block_lists(model: nn.Module) -> List[nn.Module]:
    """Transformer blocks of a model (``blocks`` and, for the MAE, ``decoder_blocks``)."""
    out = []
    for attr in ("blocks", "decoder_blocks"):
        blocks = getattr(model, attr, None)
        if blocks is not None:
            out.extend(list(blocks))
    return out


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block in backward through the model's own switch (``set_grad_checkpointing``, the model
    contract); parameter names are unchanged. Returns #blocks."""
    switch = getattr(model, "set_grad_checkpointing", None)
    n = switch(True) if switch is not None else 0
    if not n:
        raise ValueError(f"engine.activation_checkpointing: {type(model).__name__} has no set_grad_checkpointing() "
                         "or no blocks to checkpoint")
    return n


def apply_compile(model: nn.Module, scope: str = "blocks") -> None:
    """torch.compile in place (parameter names are kept): each block (``scope="blocks"``; the whole
    model when it has none) or the whole model (``scope="model"``)."""
    if scope not in ("blocks", "model"):
        raise ValueError(f"engine.compile_scope={scope!r}: use auto, model or blocks")
    blocks = block_lists(model) if scope == "blocks" else []
    for b in blocks or [model]:
        b.compile()


class Weights:
    """The parameters of a wrapped model as the rest of the run sees them, replicated (local, ddp): the tensors the
    EMA follows (:meth:`ema_sources`), and the full model, EMA and optimizer state, gathered on rank 0 for exports
    and evaluation (collectives on the sharding engines). FSDP2 and DeepSpeed subclass it for their layouts."""

    # How EMA tensors are laid out: "replicated" (full on every rank), "dtensor" (FSDP2 shards, saved through DCP)
    # or "per_rank" (DeepSpeed ZeRO-3 partitions, or ZeRO-1/2 fp32 master fragments in bf16/fp16).
    layout = "replicated"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer):
        self.module, self.optimizer = module, optimizer

    def ema_sources(self) -> List[Tuple[str, torch.Tensor]]:
        """(name, tensor) pairs the EMA follows, in this engine's layout."""
        return [(n, p) for n, p in self.module.named_parameters()]

    def gather_ema(self, ema_state: dict) -> dict:
        """Full (unsharded, CPU fp32) EMA tensors; collective; rank 0 gets the dict."""
        return {k: v.detach().float().cpu() for k, v in ema_state.items()}

    def full_model_state_dict(self) -> dict:
        """Full fp32 model state dict on CPU (collective; meaningful on rank 0)."""
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def full_ema_state_dict(self, ema_state: dict, model_sd: Optional[dict] = None) -> dict:
        """The EMA's full state dict: ``model_sd`` (the full model state dict, gathered when not given) with the EMA's
        gathered tensors over it, so buffers and frozen parameters the EMA does not follow come from the model.
        Collective; complete on rank 0."""
        model_sd = self.full_model_state_dict() if model_sd is None else model_sd
        return {**model_sd, **self.gather_ema(ema_state)}

    def full_optimizer_state_dict(self) -> Optional[dict]:
        """Full optimizer state in torch's index-keyed format (rank 0)."""
        return self.optimizer.state_dict()


class Engine:
    """Parallelize + step. Subclasses wrap the model and build the optimizer in their constructor and set
    :attr:`weights` and :attr:`state`; this base class does the accumulation bookkeeping, autocast, and the
    gradient-norm / clip / skip logic of :meth:`step`."""

    name = "base"

    def __init__(self, model: nn.Module, *, accum_iter: int = 1, clip_grad: float = 0.0,
                 precision: str = "fp32", device: torch.device = torch.device("cpu")):
        self.unwrapped = model
        self.model: nn.Module = model
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.accum_iter = accum_iter
        self.clip_grad = clip_grad
        self.precision = precision
        self.device = device
        self.micro_step = 0  # micro-steps since the last boundary
        self.scaler = None
        if precision == "fp16":
            self.scaler = torch.amp.GradScaler(device.type)
        self.weights: Optional[Weights] = None  # set by the subclass once the model is wrapped
        self.state = None  # the checkpoint I/O part (DCPState or DeepSpeed's), set by the subclass

    # ---------------------------------------------------------------- forward
    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def _is_boundary(self) -> bool:
        """True when the current micro-step ends an accumulation window."""
        return (self.micro_step + 1) % self.accum_iter == 0

    def sync_context(self):
        """Context for forward+backward of one micro-step (DDP no_sync between boundaries)."""
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- backward / step
    def backward(self, loss: torch.Tensor) -> None:
        loss = poison_nonfinite(loss) / self.accum_iter
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def skips_on_device(self) -> bool:
        """True when a non-finite step can be skipped without a host sync: no GradScaler and an optimizer
        whose step honours ``found_inf`` (torch's fused Adam/AdamW/SGD set ``_step_supports_amp_scaling``)."""
        return self.scaler is None and bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def step(self) -> Optional[StepResult]:
        boundary = self._is_boundary()
        self.micro_step = (self.micro_step + 1) % self.accum_iter
        if not boundary:
            return None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.unwrapped.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm_t = torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros((), device=self.device)
        norm_full = (norm_t.full_tensor() if hasattr(norm_t, "full_tensor") else norm_t).float()
        ok_t = torch.isfinite(norm_full)
        on_device = self.skips_on_device()
        ok = on_device or bool(ok_t)                          # else: a host decision (one sync)
        if ok and self.clip_grad > 0:
            # On the device a non-finite norm turns the gradients into NaN; that step is skipped just below.
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad, norm_t)
        if on_device:
            # found_inf = 1 makes the fused kernel leave parameters, moments and step counts as they were.
            self.optimizer.found_inf = (~ok_t).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif ok:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self._zero_grad()
        return StepResult(ok=ok_t, norm=norm_full)

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def param_groups(self) -> list:
        """The optimizer's param groups (the LR schedule writes their lr)."""
        return self.optimizer.param_groups

    def close(self) -> None:
        pass
