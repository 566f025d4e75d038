"""The DeepSpeed JSON config, generated from ours.

:func:`generate_config` is a pure function of our settings (micro-batch, accumulation, world size, ZeRO stage,
precision, clipping, reduction dtype); :func:`config_for_job` reads those settings from a :class:`JobConfig`.
A user-supplied ``engine.deepspeed_config`` JSON is merged over the generated config by :func:`merge_user_config`:
the keys our config owns (:data:`OWNED_KEYS`: batch sizes, accumulation, ZeRO stage, precision, clipping,
reduction dtype) must be absent, ``"auto"`` or equal to our value, and ``optimizer`` / ``scheduler`` must be
absent (usp_scale builds both); anything else is a :class:`ConfigError` that lists every conflicting key and where
to set it instead. :func:`validate_config` then parses the merged dict with DeepSpeed's own config classes, so a
misspelt or mistyped key fails here, naming the file and the key, not inside ``deepspeed.initialize``.
"""
from __future__ import annotations

import copy
import json
import os

import torch

from ...config import ConfigError
from ..base import device_precision

# Generated key -> the usp_scale config key that sets it.
OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "schedule.accum_iter",
    "train_batch_size": "data.batch_size x schedule.accum_iter x world size",
    "zero_optimization.stage": "engine.zero_stage",
    "bf16.enabled": "engine.precision",
    "fp16.enabled": "engine.precision",
    "gradient_clipping": "optim.clip_grad",
    "communication_data_type": "engine.reduce_dtype",
}
# Top-level keys a user JSON may not set at all -> where usp_scale builds them from.
FORBIDDEN_KEYS = {"optimizer": "optim.*", "scheduler": "schedule.*"}


def generate_config(*, micro_batch: int, accum_iter: int, world_size: int, zero_stage: int, precision: str,
                    clip_grad: float, reduce_dtype: str = "fp32", device_type: str = "cpu") -> dict:
    """DeepSpeed JSON config (a dict) from our settings; pure.

    The settings are those of a checked config (the rules of :mod:`usp_scale.config.validate`); ``precision`` is
    resolved for the device ("fp32", "bf16" or "fp16"). fp16 needs ``device_type="cuda"`` (DeepSpeed's fp16 loss
    scaler does not run on the CPU). ``train_batch_size = micro_batch * accum_iter * world_size``."""
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError("engine.precision=fp16 is not supported by DeepSpeed on CPU; use bf16 or fp32")
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_iter,
        "train_batch_size": micro_batch * accum_iter * world_size,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "gradient_clipping": float(clip_grad),
        # Gradient reduction dtype (DeepSpeed's default is the model dtype, i.e. bf16/fp16 under mixed precision).
        "communication_data_type": reduce_dtype,
        # Our optimizer is torch's AdamW / LARS, built by usp_scale.training.optim.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}, "c": {}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _set(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = copy.deepcopy(value)


def _shape_conflicts(generated: dict, user: dict, source: str, prefix: str = "") -> list:
    """Keys where one side has a JSON object and the other a plain value (a merge would drop one of them)."""
    out = []
    for k, v in user.items():
        if k not in generated:
            continue
        g, key = generated[k], f"{prefix}{k}"
        if isinstance(g, dict) and not isinstance(v, dict):
            out.append(f"  '{key}': {source} gives {v!r}, DeepSpeed expects a JSON object here (e.g. {g})")
        elif isinstance(v, dict) and not isinstance(g, dict):
            out.append(f"  '{key}': {source} gives a JSON object, DeepSpeed expects a plain value here (e.g. {g!r})")
        elif isinstance(v, dict):
            out.extend(_shape_conflicts(g, v, source, f"{key}."))
    return out


def merge_user_config(generated: dict, user: dict, source: str = "--deepspeed_config") -> dict:
    """Merge ``user`` over ``generated`` (a new dict; neither input changes); raise a :class:`ConfigError` listing
    every conflict with the keys we own, every forbidden key and every object/value mismatch, named with
    ``source`` (the user's file)."""
    conflicts = []
    for key, where in FORBIDDEN_KEYS.items():
        if key in user:
            conflicts.append(f"  '{key}': usp_scale builds it from {where}; remove it from {source}")
    conflicts += _shape_conflicts(generated, user, source)
    flat_gen, flat_user = _flatten(generated), _flatten(user)
    for key, where in OWNED_KEYS.items():
        if key in flat_user and flat_user[key] != "auto" and flat_user[key] != flat_gen.get(key):
            conflicts.append(f"  '{key}': ours={flat_gen.get(key)!r}, {source}={flat_user[key]!r} "
                             f"(set {where} instead, or remove the key / use \"auto\")")
    if conflicts:
        raise ConfigError(f"{source} conflicts with the usp_scale config:\n" + "\n".join(conflicts))
    merged = copy.deepcopy(generated)
    for key, value in flat_user.items():
        if value == "auto":
            continue
        _set(merged, key, value)
    return merged


def load_user_config(path: str) -> dict:
    """The JSON object in ``path``; a :class:`ConfigError` naming the file when it is missing, not UTF-8 JSON, or
    not an object."""
    if not os.path.isfile(path):
        raise ConfigError(f"engine.deepspeed_config: file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object, got {type(obj).__name__}")
    return obj


def _user_keys_at(loc: tuple, user: dict) -> list:
    """Dotted keys of ``user`` whose last components are ``loc`` (DeepSpeed parses each section on its own, so its
    error locations are relative to the section)."""
    tail = [str(p) for p in loc]
    keys = [k for k in _flatten(user) if tail and k.split(".")[-len(tail):] == tail]
    if not tail:
        return []
    return keys or [".".join(tail)]


def validate_config(merged: dict, user: dict, source: str) -> None:
    """Parse ``merged`` with DeepSpeed's own config classes (``deepspeed.runtime.config.DeepSpeedConfig``, no
    process group needed); a misspelt, mistyped or contradictory key is a :class:`ConfigError` naming ``source``
    and the key(s) of ``user`` it came from."""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    # train_batch_size is ours (checked by merge_user_config); without it DeepSpeed derives it from the
    # micro-batch and accumulation, so the check does not depend on the world size of this process.
    probe = {k: v for k, v in merged.items() if k != "train_batch_size"}
    try:
        DeepSpeedConfig(probe)
    except Exception as e:  # noqa: BLE001 - pydantic ValidationError, AssertionError, ValueError, TypeError
        errors = getattr(e, "errors", None)
        lines = []
        if callable(errors):  # pydantic: one entry per bad field of one section
            for err in errors():
                keys = ", ".join(f"'{k}'" for k in _user_keys_at(tuple(err.get("loc", ())), user))
                lines.append(f"  {keys}: {err.get('msg')} (got {err.get('input')!r})")
        else:
            lines.append(f"  {type(e).__name__}: {e}")
        raise ConfigError(f"{source}: DeepSpeed {deepspeed.__version__} rejects the merged config "
                          f"({getattr(e, 'title', 'DeepSpeedConfig')}):\n" + "\n".join(lines)) from e


def build_config(*, micro_batch: int, accum_iter: int, world_size: int, zero_stage: int, precision: str,
                 clip_grad: float, reduce_dtype: str = "fp32", device_type: str = "cpu", user_config: str = "") -> dict:
    """:func:`generate_config`, then (when ``user_config`` names a JSON file) the file merged over it and the
    result validated by DeepSpeed."""
    cfg = generate_config(micro_batch=micro_batch, accum_iter=accum_iter, world_size=world_size,
                          zero_stage=zero_stage, precision=precision, clip_grad=clip_grad, reduce_dtype=reduce_dtype,
                          device_type=device_type)
    if not user_config:
        return cfg
    user = load_user_config(user_config)
    merged = merge_user_config(cfg, user, user_config)
    validate_config(merged, user, user_config)
    return merged


def config_for_job(job, world_size: int, *, device_type: str = "cpu") -> dict:
    """The DeepSpeed config a job runs with on ``world_size`` ranks: :func:`build_config` over the fields of a
    :class:`~usp_scale.config.JobConfig` whose batch plan and precision were resolved at start-up
    (:func:`usp_scale.config.resolve_job`: ``schedule.accum_iter`` derived, ``engine.precision`` not "official";
    "auto" resolves for ``device_type``)."""
    precision = device_precision(job.engine.precision, torch.device(device_type))
    return build_config(micro_batch=job.data.batch_size, accum_iter=job.schedule.accum_iter, world_size=world_size,
                        zero_stage=job.engine.zero_stage, precision=precision, clip_grad=job.optim.clip_grad,
                        reduce_dtype=job.engine.reduce_dtype, device_type=device_type,
                        user_config=job.engine.deepspeed_config)
