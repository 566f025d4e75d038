"""Shared host-side helpers for the Triton kernels (block sizes, dtypes, autocast)."""
from __future__ import annotations

import os
from typing import Optional

import torch


# Triton reads TRITON_INTERPRET when @triton.jit decorates, i.e. when the kernel modules are imported;
# reading it once here keeps the hot path free of environment look-ups (and torch.compile-friendly).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def rows_per_program(block_d: int, rows: int, gpu_elems: int = 4096, interp_elems: int = 1 << 16) -> int:
    """Rows per program for a (rows, block_d) tile: small tiles on a GPU (registers), big ones in the
    interpreter (each program instance runs in Python, so fewer and larger is faster)."""
    budget = interp_elems if interpreting() else gpu_elems
    r = max(1, budget // block_d)
    return min(1 << (r.bit_length() - 1), next_pow2(max(1, rows)))


def num_warps_for(tile_elems: int) -> int:
    """About 8 elements of a (rows, cols) tile per thread, 1 to 8 warps: on sm_90 every kernel then stays
    at <= 128 registers per thread (compile_check prints them)."""
    return max(1, min(8, next_pow2(tile_elems // 256) if tile_elems >= 256 else 1))


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def compute_dtype(device: torch.device, *dtypes: torch.dtype) -> torch.dtype:
    """dtype a torch matmul on these inputs would produce (autocast's dtype when it is on)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def promote(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """Result dtype of elementwise torch arithmetic over the given tensors (None skipped)."""
    out = None
    for t in tensors:
        if t is None:
            continue
        out = t.dtype if out is None else torch.promote_types(out, t.dtype)
    return out


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def opaque_op(name: str, impl, fake):
    """``impl`` (a plain function launching Triton kernels) as a ``usp_scale_kernels::<name>`` custom op,
    returned as a caller that runs ``impl`` directly in eager mode and the custom op only while
    torch.compile traces. Eager calls thus skip the custom-op dispatch (schema checks, dispatcher
    round-trip, Python re-entry: tens of microseconds per call), and compiled graphs still see an opaque
    call (fullgraph works). Both paths run the same ``impl``, so the numbers are identical."""
    op = torch.library.custom_op(f"usp_scale_kernels::{name}", impl, mutates_args=())
    op.register_fake(fake)

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return impl(*args)

    call.op = op
    call.__name__ = name
    call.__doc__ = impl.__doc__
    return call
