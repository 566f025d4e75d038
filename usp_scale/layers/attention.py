"""Multi-head self-attention: the one attention module every model uses (timm key layout: ``qkv``, ``proj``).

One forward with one switch, as timm's ``fused_attn``: the **fused** path runs the attention kernel this process
chose at start-up; the **reference** path is the explicit softmax(q k^T / sqrt(d)) v in fp32
(:func:`attention_reference`), the readable definition the fused kernels are tested against.

The kernel is chosen once, by :func:`configure_attention` (config ``model.attn_backend``), from the value, the
device and the installed packages only: no timing, no probe and no collective runs inside a forward.

- ``auto``: on CUDA, FlashAttention-3 (``flash_attn_interface``) on a Hopper GPU when it imports, else
  FlashAttention-2 (``flash_attn``) when it imports, else ``sdpa``. On the CPU, SDPA's math kernel.
- ``sdpa``: ``F.scaled_dot_product_attention``. On CUDA its backends are tried in the priority cuDNN ->
  flash -> memory-efficient (the first that supports the inputs; never math: inputs none of them takes are an
  error); on the CPU SDPA picks its own kernel.
- ``flash3`` / ``flash2``: that FlashAttention package; ``cudnn`` / ``efficient`` / ``math``: that SDPA backend.
  A forced backend that cannot run (package missing, wrong device) is an error at start-up, never a fallback.
- ``reference``: the explicit softmax in every module (slow; for checks).

Inputs a FlashAttention kernel does not take go to the ``sdpa`` path under ``auto``: fp32 inputs (e.g. fp32
sampling), and head dims outside the kernel's set (FlashAttention-3 here only for the head dims it has its own
kernels for, :data:`FLASH3_HEAD_DIMS`, so the 72 of the XL models and the 32 of the MAE decoder run
FlashAttention-2 or SDPA). That is a rule of dtype and head dim, the same on every rank. With a forced
``flash2``/``flash3`` such inputs are an error.

In a distributed job (torch.distributed initialised, world size > 1) every rank calls
:func:`configure_attention` at start-up; one ``all_gather_object`` there makes ``auto`` take the first
candidate available on every rank, and turns a forced backend missing on some rank into an error on all ranks.
"""
from __future__ import annotations

import importlib
import logging
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger("usp_scale.attention")

BACKENDS = ("auto", "sdpa", "flash3", "flash2", "cudnn", "efficient", "math", "reference")
# Head dims FlashAttention-3 has its own kernels for; others go elsewhere under auto.
FLASH3_HEAD_DIMS = (64, 96, 128, 192, 256)
FLASH2_MAX_HEAD_DIM = 256
# SDPA backends on CUDA for "sdpa", in priority order: cuDNN first, the fastest of the three at the DiT and MAE
# attention shapes on Hopper; each later one only for inputs the earlier ones do not take.
SDPA_CUDA_PRIORITY = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
_SDPA_ONE = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH}


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Explicit softmax attention, (B, H, N, d) each -> (B, H, N, d), computed in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    attn = (q.float() @ k.float().transpose(-2, -1)) * scale
    return (attn.softmax(dim=-1) @ v.float()).to(q.dtype)


# ------------------------------------------------------------------------------------------- kernels
# Each maps packed qkv (B, N, 3, H, d) -> (B, N, H, d).

def _reference(qkv: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # each (B, H, N, d)
    return attention_reference(q, k, v).transpose(1, 2)


def _sdpa_with(backends: Optional[Tuple[SDPBackend, ...]], priority: bool = False) -> Callable:
    def run(qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # each (B, H, N, d)
        if backends is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel(list(backends), set_priority=priority):
                out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2)                                      # (B, N, H, d)

    return run


def _flash2(qkv: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_qkvpacked_func

    return flash_attn_qkvpacked_func(qkv)                               # (B, N, H, d)


def _flash3(qkv: torch.Tensor) -> torch.Tensor:
    from flash_attn_interface import flash_attn_func

    q, k, v = qkv.unbind(2)                                             # each (B, N, H, d)
    out = flash_attn_func(q, k, v, softmax_scale=qkv.shape[-1] ** -0.5)
    return out[0] if isinstance(out, tuple) else out                    # some releases also return lse


def flash_takes(name: str, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why FlashAttention ``name`` does not take inputs of this dtype and head dim (None when it does)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{name} needs fp16/bf16 inputs, got {str(dtype).replace('torch.', '')}"
    if name == "flash3" and head_dim not in FLASH3_HEAD_DIMS:
        return f"flash3 has no kernel for head_dim {head_dim} (it has {FLASH3_HEAD_DIMS})"
    if name == "flash2" and head_dim > FLASH2_MAX_HEAD_DIM:
        return f"flash2 takes head dims up to {FLASH2_MAX_HEAD_DIM}, got {head_dim}"
    return None


# ------------------------------------------------------------------------------------------- availability
def _module_present(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # ImportError, or a broken build (missing CUDA extension)
        return False
    return True


def backend_unavailable(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device`` whatever the inputs (None when it can)."""
    if name in ("flash2", "flash3", "cudnn", "efficient") and device.type != "cuda":
        return f"{name} needs a CUDA device, got {device}"
    if name == "flash2" and not _module_present("flash_attn"):
        return "flash2 needs the flash_attn package (pip install flash-attn)"
    if name == "flash3":
        if not _module_present("flash_attn_interface"):
            return "flash3 needs FlashAttention-3 (flash_attn_interface, built from flash-attention/hopper)"
        cap = torch.cuda.get_device_capability(device)
        if cap[0] != 9:
            return f"flash3 needs a Hopper GPU (sm_90), got capability {cap}"
    return None


# ------------------------------------------------------------------------------------------- the choice
# The process-wide choice: the backend asked for, the one it resolved to, and the kernel it runs.
_STATE: Dict[str, object] = {"requested": None, "backend": None, "fn": None}


def _sdpa_fn(device: torch.device) -> Callable:
    return _sdpa_with(SDPA_CUDA_PRIORITY, priority=True) if device.type == "cuda" else _sdpa_with(None)


def _kernel(backend: str, device: torch.device, requested: str) -> Callable:
    """The (B, N, 3, H, d) -> (B, N, H, d) function for a resolved backend."""
    if backend == "reference":
        return _reference
    if backend == "sdpa":
        return _sdpa_fn(device)
    if backend in _SDPA_ONE:
        return _sdpa_with((_SDPA_ONE[backend],))
    flash = _flash3 if backend == "flash3" else _flash2
    sdpa = _sdpa_fn(device)
    forced = requested == backend

    def run(qkv: torch.Tensor) -> torch.Tensor:
        why = flash_takes(backend, qkv.dtype, qkv.shape[-1])
        if why is None:
            return flash(qkv)
        if forced:
            B, N, _, H, d = qkv.shape
            raise RuntimeError(f"model.attn_backend={backend} cannot run attention with B={B} heads={H} tokens={N} "
                               f"head_dim={d}: {why}. Use model.attn_backend=auto (SDPA takes such inputs).")
        return sdpa(qkv)

    return run


def _candidates(backend: str, device: torch.device) -> Tuple[List[str], List[str]]:
    """(backends this rank can run for ``backend``, in preference order; why the others were passed over)."""
    if backend != "auto":
        why = backend_unavailable(backend, device)
        return ([] if why else [backend]), ([why] if why else [])
    if device.type != "cuda":
        return ["math"], []
    ok, skipped = [], []
    for name in ("flash3", "flash2"):
        why = backend_unavailable(name, device)
        (skipped.append(why) if why else ok.append(name))
    return ok + ["sdpa"], skipped


def configure_attention(backend: str, device, agree: bool = True) -> str:
    """Choose this process's attention kernel (call once at start-up, before the first forward); returns the
    backend it resolved to. ``backend``: one of :data:`BACKENDS` (config ``model.attn_backend``).

    With ``agree`` (default) and torch.distributed initialised with world size > 1 this is a collective: every
    rank must call it (the trainer and launchers/sample.py do, at start-up). A forced backend that cannot run
    on ``device`` (on any rank) raises here, on every rank."""
    if backend not in BACKENDS:
        raise ValueError(f"model.attn_backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    ok, skipped = _candidates(backend, device)
    where = ""
    if agree and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every: List[Tuple[List[str], List[str]]] = [None] * dist.get_world_size()   # type: ignore[list-item]
        dist.all_gather_object(every, (ok, skipped))
        missing = {r: s for r, (o, s) in enumerate(every) if not o}
        if missing:
            raise RuntimeError(f"model.attn_backend={backend} is unavailable on rank(s) {sorted(missing)}: "
                               f"{next(iter(missing.values()))[0]}. Use model.attn_backend=auto (or sdpa).")
        lost = [c for c in ok if not all(c in o for o, _ in every)]
        skipped += [f"{c}: not available on every rank" for c in lost]
        ok = [c for c in ok if c not in lost]
        where = f", agreed over {dist.get_world_size()} ranks"
    if not ok:
        raise RuntimeError(f"model.attn_backend={backend} is unavailable: {skipped[0]}. "
                           f"Use model.attn_backend=auto (or sdpa) to let the dispatcher choose.")
    chosen = ok[0]
    _STATE.update(requested=backend, backend=chosen, fn=_kernel(chosen, device, backend))
    detail = "; ".join(skipped)
    log.info("attention: model.attn_backend=%s on %s -> %s%s%s", backend, device, chosen, where,
             f" ({detail})" if detail else "")
    return chosen


def reset_attention() -> None:
    """Forget the configuration (plain SDPA with its own kernel choice again)."""
    _STATE.update(requested=None, backend=None, fn=None)


def current_backend() -> Optional[str]:
    """The backend :func:`configure_attention` resolved to (None when not configured)."""
    return _STATE["backend"]  # type: ignore[return-value]


def use_fused_attn() -> bool:
    """False when the process runs the explicit reference everywhere (``model.attn_backend=reference``)."""
    return _STATE["backend"] != "reference"


def attention_packed(qkv: torch.Tensor) -> torch.Tensor:
    """Packed qkv (B, N, 3, H, d) -> (B, N, H, d) through the configured kernel (plain SDPA if none)."""
    fn = _STATE["fn"]
    if fn is None:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return fn(qkv)  # type: ignore[operator]


class Attention(nn.Module):
    """x (B, N, C) -> (B, N, C); C = heads * head_dim. ``fused_attn``: None follows the process
    (:func:`use_fused_attn`), True/False forces the fused kernel / the explicit reference in this module."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused_attn: Optional[bool] = None
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def transform_qkv(self, qkv: torch.Tensor, rope=None) -> torch.Tensor:
        """Hook between the projection and the kernel, (B, N, 3, H, d) -> (B, N, 3, H, d): the identity here;
        :class:`usp_scale.layers.rope.RoPEAttention` applies QK-norm and rotary embeddings (``rope``)."""
        if rope is not None:
            raise TypeError(f"{type(self).__name__} applies no rotary embedding; use layers.rope.RoPEAttention")
        return qkv

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)    # (B, N, 3, H, d)
        qkv = self.transform_qkv(qkv, rope)
        fused = use_fused_attn() if self.fused_attn is None else self.fused_attn
        x = attention_packed(qkv) if fused else _reference(qkv)              # (B, N, H, d)
        return self.proj(x.reshape(B, N, C))
