"""The one attention module every model uses, and the attention backend dispatch.

Multi-head self-attention with a fused qkv projection (timm key layout: ``qkv``, ``proj``). The core
goes through :func:`attention_packed`, whose backend is chosen once per run by
:func:`configure_attention` (config ``model.attn_backend``):

- ``auto``: on CUDA, FlashAttention-3 (``flash_attn_interface``) on Hopper when installed, else
  FlashAttention-2 (``flash_attn``) when installed, else SDPA with its backend timed per shape (cuDNN,
  flash, memory-efficient) at the first call of each shape; on CPU, SDPA's math backend.
- ``sdpa``: SDPA with the per-shape timed choice (math on CPU).
- ``flash3`` / ``flash2`` / ``cudnn`` / ``efficient`` / ``math``: exactly that backend. A forced backend that
  cannot run (package missing, wrong device or dtype, unsupported head dim) is an error, never a fallback.

Every choice is logged once per shape. Without :func:`configure_attention`, SDPA picks its own kernel.

**Distributed jobs.** When ``torch.distributed`` is initialized (world size > 1) and ``sync`` is on (the
default), a timed/probed choice is agreed by all ranks of the default process group: each rank probes and
times the candidates, one ``all_reduce(MAX)`` combines them (a candidate that fails on any rank counts as
unavailable; the time is the slowest rank's), and every rank takes the same argmin, so all ranks run the same
kernel (same numerics, no rank-dependent recompile). Rank 0 logs the agreed choice. This puts one collective
inside the first forward at each new shape, which is safe when every rank reaches its first call of each shape
in the same order (data parallelism: DDP, FSDP, DeepSpeed ZeRO, where all ranks run the same shapes at the same
step); the ranks' shapes are checked to be equal. Where that does not hold (ranks with different shapes, or
forwards on only some ranks, e.g. a sample grid on rank 0, or resumed sampling where ranks have different
amounts of work left), pass the shapes to ``configure_attention(..., shapes=[...])`` beforehand, or run one
forward on every rank first (launchers/sample.py does), or wrap the rank-local forwards in
``with attention_sync(False):`` (or configure with ``sync=False``).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import math
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger("usp_scale.attention")

BACKENDS = ("auto", "sdpa", "flash2", "flash3", "math", "cudnn", "efficient")
_SDPA = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
# SDPA backends timed per shape on CUDA, in tie-break order; math is never chosen on a GPU.
SDPA_GPU_CANDIDATES = ("cudnn", "flash", "efficient")


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Explicit softmax attention, (B, H, N, d) -> (B, H, N, d), computed in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    attn = (q.float() @ k.float().transpose(-2, -1)) * scale
    return (attn.softmax(dim=-1) @ v.float()).to(q.dtype)


# ------------------------------------------------------------------------------------------- backends
# Each backend maps packed qkv (B, N, 3, H, d) -> (B, N, H, d).

def _sdpa_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    backend = _SDPA[name]

    def run(qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # each (B, H, N, d)
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2)                                      # (B, N, H, d)

    run.__name__ = f"sdpa_{name}"
    return run


def _sdpa_default(qkv: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def _flash2(qkv: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_qkvpacked_func

    return flash_attn_qkvpacked_func(qkv)                               # (B, N, H, d)


def _flash3(qkv: torch.Tensor) -> torch.Tensor:
    from flash_attn_interface import flash_attn_func

    q, k, v = qkv.unbind(2)                                             # each (B, N, H, d)
    out = flash_attn_func(q, k, v, softmax_scale=qkv.shape[-1] ** -0.5)
    return out[0] if isinstance(out, tuple) else out                    # some releases also return lse


# ------------------------------------------------------------------------------------------- availability
def _module_present(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # ImportError, or a broken build (missing CUDA extension)
        return False
    return True


def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def backend_unavailable(name: str, device: torch.device) -> Optional[str]:
    """Why ``name`` cannot run on ``device`` regardless of shape (None when it can be tried)."""
    if name in ("flash2", "flash3", "cudnn", "efficient") and device.type != "cuda":
        return f"{name} needs a CUDA device, got {device}"
    if name == "flash2" and not _module_present("flash_attn"):
        return "flash2 needs the flash_attn package (pip install flash-attn)"
    if name == "flash3":
        if not _module_present("flash_attn_interface"):
            return "flash3 needs FlashAttention-3 (flash_attn_interface, built from flash-attention/hopper)"
        if not _is_hopper(device):
            return f"flash3 needs a Hopper GPU (sm_90), got capability {torch.cuda.get_device_capability(device)}"
    return None


def _fn_for(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "flash2":
        return _flash2
    if name == "flash3":
        return _flash3
    return _sdpa_fn(name[len("sdpa_"):] if name.startswith("sdpa_") else name)


def _probe_input(key: "ShapeKey", device: torch.device) -> torch.Tensor:
    """Random packed qkv (B, N, 3, H, d) for probing/timing, from a private generator (global RNG untouched)."""
    B, H, N, d, dtype = key
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randn(B, N, 3, H, d, device=device, dtype=dtype, generator=g).requires_grad_()


def _probe(name: str, key: "ShapeKey", device: torch.device) -> Optional[str]:
    """Run ``name`` once at this shape (forward and backward); None if it works, else the error text."""
    dtype = key[4]
    if name in ("flash2", "flash3") and dtype not in (torch.float16, torch.bfloat16):
        return f"{name} needs fp16/bf16 inputs, got {dtype} (enable bf16 autocast or pick an SDPA backend)"
    try:
        with torch.inference_mode(False), torch.enable_grad():   # the first call may come from sampling
            _fn_for(name)(_probe_input(key, device)).sum().backward()
    except Exception as e:  # "No available kernel", unsupported head dim, ...
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _time_ms(name: str, key: "ShapeKey", device: torch.device, reps: int = 10) -> float:
    """Median forward+backward time (ms) of ``name`` at this shape, with CUDA events."""
    fn = _fn_for(name)
    times = []
    with torch.inference_mode(False), torch.enable_grad():
        qkv = _probe_input(key, device)
        for _ in range(3):
            fn(qkv).sum().backward()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(qkv).sum().backward()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------------------- dispatch state
ShapeKey = Tuple[int, int, int, int, torch.dtype]      # (B, H, N, d, dtype)

_STATE: Dict[str, object] = {"backend": None, "device": None, "fn": None, "sync": True}
_CHOICES: Dict[Tuple, Tuple[str, Callable]] = {}      # (H, N, d, dtype) -> (name, fn)


def set_attention_fn(fn) -> None:
    """Install a (q, k, v) -> out function, (B, H, N, d) each, for all layers (None removes it).
    A test/debug hook that overrides :func:`configure_attention`."""
    _STATE["fn"] = fn


def configure_attention(backend: str, device, shapes: Iterable[Tuple[int, int, int, int, torch.dtype]] = (),
                        sync: bool = True) -> None:
    """Select the attention backend for this process (call once, before the first forward).

    ``backend``: one of :data:`BACKENDS` (config ``model.attn_backend``). ``shapes``: optional
    (B, H, N, d, dtype) tuples to choose for now rather than at their first call (in a distributed job every
    rank must pass the same list: the choice is agreed here, so no collective runs inside a forward for them).
    ``sync``: agree timed choices over all ranks when torch.distributed is initialized (see the module doc).
    A forced backend that cannot run on ``device`` raises here; one that cannot run a given shape raises at
    that shape.
    """
    if backend not in BACKENDS:
        raise ValueError(f"model.attn_backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if backend not in ("auto", "sdpa", "math"):
        why = backend_unavailable(backend, device)
        if why is not None:
            raise RuntimeError(f"model.attn_backend={backend} is unavailable: {why}. "
                               f"Use model.attn_backend=auto (or sdpa) to let the dispatcher choose.")
    _STATE["backend"], _STATE["device"], _STATE["sync"] = backend, device, bool(sync)
    _CHOICES.clear()
    log.info("attention: backend %s requested on %s", backend, device)
    for shape in shapes:
        _choose(tuple(shape))


@contextlib.contextmanager
def attention_sync(enabled: bool):
    """Within this block, agree new choices over ranks (True) or choose per rank (False). Use False around
    forwards that run on some ranks only (e.g. a sample grid on rank 0), where a collective would hang."""
    old, _STATE["sync"] = _STATE["sync"], bool(enabled)
    try:
        yield
    finally:
        _STATE["sync"] = old


def reset_attention() -> None:
    """Forget the configuration (SDPA picks its own kernel again)."""
    _STATE.update(backend=None, device=None, fn=None, sync=True)
    _CHOICES.clear()


def current_choices() -> Dict[Tuple, str]:
    """{(H, N, d, dtype): backend name} chosen so far."""
    return {k: v[0] for k, v in _CHOICES.items()}


def _auto_order(device: torch.device) -> Tuple[str, ...]:
    if device.type != "cuda":
        return ("sdpa_math",)
    order = []
    if backend_unavailable("flash3", device) is None:
        order.append("flash3")
    if backend_unavailable("flash2", device) is None:
        order.append("flash2")
    return tuple(order) + ("sdpa",)


def _synced() -> bool:
    """Whether choices are agreed over ranks now (sync on, torch.distributed initialized, world size > 1)."""
    return bool(_STATE.get("sync", True)) and dist.is_available() and dist.is_initialized() \
        and dist.get_world_size() > 1


_DTYPE_CODE = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}


def _agree_costs(key: ShapeKey, costs: List[float], device: torch.device) -> List[float]:
    """Per-candidate cost (inf = cannot run) combined over all ranks of the default group: the maximum, so a
    candidate that fails anywhere is inf everywhere and a time is the slowest rank's. One all_reduce; the
    ranks' shape keys (H, N, d, dtype) must be equal, else an error names them (a mismatch means the ranks'
    first calls are not in the same order, see the module doc)."""
    ck = [float(key[1]), float(key[2]), float(key[3]), float(_DTYPE_CODE.get(key[4], 0))]
    on = device if dist.get_backend() == "nccl" and device.type == "cuda" else torch.device("cpu")
    buf = torch.tensor(ck + [-c for c in ck] + list(costs), dtype=torch.float64, device=on)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    buf = buf.cpu()
    hi, lo = buf[:4].tolist(), [-x for x in buf[4:8].tolist()]
    if hi != lo:
        raise RuntimeError(
            f"attention backend choice: rank {dist.get_rank()} chooses for heads={key[1]} tokens={key[2]} "
            f"head_dim={key[3]} dtype={key[4]}, but other ranks chose for a different shape at the same time "
            f"(per-field min {lo}, max {hi}). The ranks' first calls of each shape are not in step: pass the "
            f"shapes to configure_attention(..., shapes=[...]) on every rank, or use sync=False.")
    return buf[8:].tolist()


def _choose_sdpa(key: ShapeKey, device: torch.device) -> Tuple[str, str]:
    """Time the SDPA GPU backends that run this shape (agreed over ranks when synced); (name, log detail)."""
    if device.type != "cuda":
        return "sdpa_math", "CPU"
    ok, errors = [], []
    for cand in SDPA_GPU_CANDIDATES:
        err = _probe(cand, key, device)
        (errors.append(f"{cand}: {err}") if err else ok.append(cand))
    times = {c: _time_ms(c, key, device) for c in ok}
    where = ""
    if _synced():
        local = [times.get(c, math.inf) for c in SDPA_GPU_CANDIDATES]
        agreed = _agree_costs(key, local, device)
        lost = [c for c, t in zip(SDPA_GPU_CANDIDATES, agreed) if c in ok and math.isinf(t)]
        errors += [f"{c}: fails on another rank" for c in lost]
        ok = [c for c, t in zip(SDPA_GPU_CANDIDATES, agreed) if not math.isinf(t)]
        times = dict(zip(SDPA_GPU_CANDIDATES, agreed))
        where = f"agreed over {dist.get_world_size()} ranks, slowest-rank times: "
    if not ok:
        raise RuntimeError(f"no SDPA GPU backend runs attention shape {key}"
                           f"{' on every rank' if where else ''}: {'; '.join(errors)}")
    best = min(ok, key=lambda c: times[c])   # ties: SDPA_GPU_CANDIDATES order
    detail = where + ", ".join(f"{c} {times[c]:.3f} ms" for c in ok) + "".join(f"; {e}" for e in errors)
    return f"sdpa_{best}", detail


@torch.compiler.disable
def _choose(key: ShapeKey) -> Tuple[str, Callable]:
    """Backend for this shape, chosen once. Probing never touches the global CPU/CUDA RNG streams, so the
    first forward at a new shape (e.g. after a resume, or in-training sampling) does not shift training noise."""
    ck = key[1:]
    if ck in _CHOICES:
        return _CHOICES[ck]
    device = _STATE["device"]
    devices = [device] if device is not None and device.type == "cuda" and torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        return _choose_uncached(key)


def _choose_uncached(key: ShapeKey) -> Tuple[str, Callable]:
    B, H, N, d, dtype = key
    ck = (H, N, d, dtype)
    backend, device = _STATE["backend"], _STATE["device"]
    if backend in ("math", "cudnn", "efficient", "flash2", "flash3"):
        name = backend if backend.startswith("flash") else f"sdpa_{backend}"
        err = _probe(name, key, device)
        if err is not None:
            raise RuntimeError(f"model.attn_backend={backend} cannot run attention with B={B} heads={H} "
                               f"tokens={N} head_dim={d} dtype={dtype}: {err}")
        detail = "forced"
    elif backend == "sdpa":
        name, detail = _choose_sdpa(key, device)
    else:  # auto
        name, detail, skipped = None, "", []
        order = _auto_order(device)
        if _synced():   # the same candidate sequence on every rank; one not available locally fails its probe
            order = tuple(c for c in ("flash3", "flash2") if c in order or device.type == "cuda") + ("sdpa",)
        for cand in order:
            if cand == "sdpa":
                name, detail = _choose_sdpa(key, device)
                break
            err = _probe(cand, key, device) if cand in _auto_order(device) else "unavailable on this rank"
            if _synced():   # collective on every rank, whatever the local result
                elsewhere = math.isinf(_agree_costs(key, [math.inf if err else 0.0], device)[0])
                if elsewhere and err is None:
                    err = "fails on another rank"
            if err is None:
                name = cand
                break
            skipped.append(f"{cand}: {err}")
        detail = "; ".join([detail] + skipped) if skipped else detail
    _CHOICES[ck] = (name, _fn_for(name))
    quiet = _synced() and dist.get_rank() != 0   # an agreed choice is logged once, by rank 0
    log.log(logging.DEBUG if quiet else logging.INFO, "attention: heads=%d tokens=%d head_dim=%d %s -> %s (%s)",
            H, N, d, str(dtype).replace("torch.", ""), name, detail or "auto")
    return _CHOICES[ck]


def attention_packed(qkv: torch.Tensor) -> torch.Tensor:
    """Packed qkv (B, N, 3, H, d) -> (B, N, H, d) through the configured backend."""
    if _STATE["fn"] is not None:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return _STATE["fn"](q, k, v).transpose(1, 2)
    if _STATE["backend"] is None:
        return _sdpa_default(qkv)
    B, N, _, H, d = qkv.shape
    ck = (H, N, d, qkv.dtype)
    hit = _CHOICES.get(ck)
    fn = hit[1] if hit is not None else _choose((B, H, N, d, qkv.dtype))[1]
    return fn(qkv)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) non-causal attention through the configured backend."""
    if _STATE["fn"] is not None:
        return _STATE["fn"](q, k, v)
    if _STATE["backend"] is None:
        return F.scaled_dot_product_attention(q, k, v)
    return attention_packed(torch.stack([q, k, v], dim=2).transpose(1, 3)).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)    # (B, N, 3, H, d)
        x = attention_packed(qkv)                                            # (B, N, H, d)
        return self.proj(x.reshape(B, N, C))
