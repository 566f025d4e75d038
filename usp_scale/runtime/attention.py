"""Which attention kernel this job runs: chosen once at start-up (config ``model.attn_backend``) from the value, the
device and the installed packages only (no timing, no probe), agreed over the ranks, and handed to the model when it
is built (``create_model(..., attn_backend=spec)``, as timm's modules capture ``fused_attn``). The kernels themselves
are :mod:`usp_scale.layers.attention`'s; nothing there runs a collective or reads a process-wide setting.

- ``auto``: on CUDA, FlashAttention-3 (``flash_attn_interface``) on a Hopper GPU when it imports, else
  FlashAttention-2 (``flash_attn``) when it imports, else ``sdpa``. On the CPU, SDPA's math kernel.
- ``sdpa``: ``F.scaled_dot_product_attention`` (on CUDA cuDNN -> flash -> memory-efficient, never math).
- ``flash3`` / ``flash2``: that FlashAttention package; ``cudnn`` / ``efficient`` / ``math``: that SDPA backend.
  A forced backend that cannot run (package missing, wrong device) is an error at start-up, never a fallback.
- ``reference``: the explicit softmax in every module (slow; for checks).

The spec handed to the model is the chosen kernel, with ``/sdpa`` appended where ``auto`` chose FlashAttention:
inputs that kernel does not take (fp32, other head dims) then run SDPA (:func:`attention_spec`); a forced
``flash2``/``flash3`` refuses them instead.

In a distributed job every rank resolves at start-up; one ``all_gather_object`` makes ``auto`` take the first
candidate available on every rank, and turns a forced backend missing on some rank into an error on all ranks.
"""
from __future__ import annotations

import importlib
import logging
from typing import List, Tuple

import torch
import torch.distributed as dist

log = logging.getLogger("usp_scale.attention")

BACKENDS = ("auto", "sdpa", "flash3", "flash2", "cudnn", "efficient", "math", "reference")
FLASH = ("flash3", "flash2")


def _module_present(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # ImportError, or a broken build (missing CUDA extension)
        return False
    return True


def backend_unavailable(name: str, device: torch.device) -> "str | None":
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


def candidates(backend: str, device: torch.device) -> Tuple[List[str], List[str]]:
    """(backends this rank can run for ``backend``, in preference order; why the others were passed over)."""
    if backend != "auto":
        why = backend_unavailable(backend, device)
        return ([] if why else [backend]), ([why] if why else [])
    if device.type != "cuda":
        return ["math"], []
    ok, skipped = [], []
    for name in FLASH:
        why = backend_unavailable(name, device)
        (skipped.append(why) if why else ok.append(name))
    return ok + ["sdpa"], skipped


def resolve_attention(backend: str, device, agree: bool = True) -> str:
    """The kernel ``model.attn_backend=backend`` runs on ``device`` (one of :data:`BACKENDS` but "auto").

    With ``agree`` (default) and torch.distributed initialised with world size > 1 this is a collective: every
    rank calls it at start-up (:func:`usp_scale.runtime.init_runtime`). A forced backend that cannot run on
    ``device`` (on any rank) raises here, on every rank."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    ok, skipped = candidates(backend, device)
    where = ""
    if agree and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
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
    detail = "; ".join(skipped)
    log.info("attention: model.attn_backend=%s on %s -> %s%s%s", backend, device, chosen, where,
             f" ({detail})" if detail else "")
    return chosen


def attention_spec(requested: str, chosen: str) -> str:
    """The spec a model's attention modules take: ``chosen``, plus ``/sdpa`` where ``auto`` chose FlashAttention
    (inputs it does not take then run SDPA; a forced FlashAttention refuses them)."""
    return f"{chosen}/sdpa" if requested == "auto" and chosen in FLASH else chosen
