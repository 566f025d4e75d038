"""The one comparison of two state dicts (or model signatures) by key and shape, for error messages.

Used by resume (:func:`usp_scale.checkpoint.manager.diff_signature`: the saved signature vs the model's) and by
weight loading (:func:`usp_scale.transfer.formats.diff_keys`, :mod:`usp_scale.transfer.core`).
"""
from __future__ import annotations

from typing import List, Mapping, Optional


def _shape(v) -> tuple:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def _names(keys: List[str], limit: int) -> str:
    return ", ".join(keys[:limit]) + (" ..." if len(keys) > limit else "")


def diff_shapes(saved: Mapping, current: Mapping, limit: int = 10) -> List[str]:
    """What differs between ``saved`` (the checkpoint) and ``current`` (the model), as lines:
    ``missing (N): a, b ...`` (in the model, not in the checkpoint), ``unexpected (N): ...`` (in the checkpoint,
    not in the model), then ``shape of k: checkpoint (a) vs model (b)`` per key whose shape differs. Values are
    tensors or shapes (lists/tuples of ints); at most ``limit`` names per line and ``limit`` shape lines. Empty
    when keys and shapes agree."""
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    shapes = sorted(k for k in set(saved) & set(current) if _shape(saved[k]) != _shape(current[k]))
    lines = []
    if missing:
        lines.append(f"missing ({len(missing)}): {_names(missing, limit)}")
    if unexpected:
        lines.append(f"unexpected ({len(unexpected)}): {_names(unexpected, limit)}")
    lines += [f"shape of {k}: checkpoint {_shape(saved[k])} vs model {_shape(current[k])}" for k in shapes[:limit]]
    if len(shapes) > limit:
        lines.append(f"... and {len(shapes) - limit} more shapes differ")
    return lines
