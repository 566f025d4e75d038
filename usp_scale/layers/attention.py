"""Multi-head self-attention: the one attention module every model uses (timm key layout: ``qkv``, ``proj``).

One forward with one switch, as timm's ``fused_attn``: the **fused** path runs the kernel of the module's attention
spec; the **reference** path is the explicit softmax(q k^T / sqrt(d)) v in fp32 (:func:`attention_reference`), the
readable definition the fused kernels are tested against.

The spec is a model attribute, handed over when the model is built (``create_model(..., attn_backend=spec)``; the
job's spec is chosen once at start-up by :func:`usp_scale.runtime.resolve_attention` from ``model.attn_backend``,
the device and the installed packages, agreed over the ranks there). Nothing here reads a process-wide setting or
runs a collective. Specs (:data:`KERNELS`):

- ``sdpa``: ``F.scaled_dot_product_attention``. On CUDA its backends are tried in the priority cuDNN ->
  flash -> memory-efficient (the first that supports the inputs; never math: inputs none of them takes are an
  error); on the CPU SDPA picks its own kernel. The default of a model built without a spec.
- ``flash3`` / ``flash2``: that FlashAttention package; ``cudnn`` / ``efficient`` / ``math``: that SDPA backend.
- ``reference``: the explicit softmax.
- ``flash3/sdpa``, ``flash2/sdpa`` (what ``model.attn_backend=auto`` resolves to where FlashAttention is there):
  inputs the FlashAttention kernel does not take go to ``sdpa``: fp32 inputs (e.g. fp32 sampling), and head dims
  outside the kernel's set (FlashAttention-3 here only for the head dims it has its own kernels for,
  :data:`FLASH3_HEAD_DIMS`, so the 72 of the XL models and the 32 of the MAE decoder run FlashAttention-2 or SDPA).
  That is a rule of dtype and head dim, the same on every rank. With a plain ``flash2``/``flash3`` such inputs are
  an error.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# The kernels an attention module runs (model.attn_backend's values but "auto", which start-up resolves).
KERNELS = ("sdpa", "flash3", "flash2", "cudnn", "efficient", "math", "reference")
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


# ------------------------------------------------------------------------------------------- the kernel of a spec
def _sdpa(qkv: torch.Tensor) -> torch.Tensor:
    """``sdpa``: on CUDA the priority list :data:`SDPA_CUDA_PRIORITY` (never math); on the CPU SDPA's own choice."""
    return (_SDPA_CUDA if qkv.is_cuda else _SDPA_OWN)(qkv)


_SDPA_CUDA = _sdpa_with(SDPA_CUDA_PRIORITY, priority=True)
_SDPA_OWN = _sdpa_with(None)


def attention_kernel(spec: str) -> Callable:
    """The (B, N, 3, H, d) -> (B, N, H, d) function of an attention spec (:data:`KERNELS`, or a FlashAttention
    kernel followed by ``/sdpa``: inputs it does not take then run SDPA; without the suffix they are an error).
    The spec is resolved at start-up by :func:`usp_scale.runtime.resolve_attention`."""
    name, _, fallback = spec.partition("/")
    if name not in KERNELS or fallback not in ("", "sdpa") or (fallback and name not in ("flash2", "flash3")):
        raise ValueError(f"attention backend {spec!r}: use one of {', '.join(KERNELS)} (flash2/flash3 may end in "
                         "'/sdpa')")
    if name == "reference":
        return _reference
    if name == "sdpa":
        return _sdpa
    if name in _SDPA_ONE:
        return _sdpa_with((_SDPA_ONE[name],))
    flash = _flash3 if name == "flash3" else _flash2

    def run(qkv: torch.Tensor) -> torch.Tensor:
        why = flash_takes(name, qkv.dtype, qkv.shape[-1])
        if why is None:
            return flash(qkv)
        if not fallback:
            B, N, _, H, d = qkv.shape
            raise RuntimeError(f"model.attn_backend={name} cannot run attention with B={B} heads={H} tokens={N} "
                               f"head_dim={d}: {why}. Use model.attn_backend=auto (SDPA takes such inputs).")
        return _sdpa(qkv)

    return run


def set_attention_backend(module: nn.Module, spec: str) -> int:
    """Attention spec ``spec`` for every :class:`Attention` inside ``module``; returns their number."""
    mods = [m for m in module.modules() if isinstance(m, Attention)]
    for m in mods:
        m.set_backend(spec)
    return len(mods)


class Attention(nn.Module):
    """x (B, N, C) -> (B, N, C); C = heads * head_dim. ``backend``: the attention spec (:func:`attention_kernel`),
    captured at construction (``create_model(..., attn_backend=...)`` sets it on every module); ``fused_attn``
    (timm's switch) False runs the explicit reference in this module."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.set_backend(backend)

    def set_backend(self, spec: str) -> None:
        """Run attention spec ``spec`` from now on (``fused_attn`` follows: False for "reference")."""
        self._kernel = attention_kernel(spec)
        self.backend = spec
        self.fused_attn = spec != "reference"

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
        x = self._kernel(qkv) if self.fused_attn else _reference(qkv)        # (B, N, H, d)
        return self.proj(x.reshape(B, N, C))
