"""DeepSpeed ZeRO-1/2/3 as one adapter behind :class:`usp_scale.engine.base.Engine`.

* :mod:`.config`: the DeepSpeed JSON generated from our config, a user JSON merged over it and validated;
* :mod:`.engine`: :class:`DeepSpeedEngine`, ``deepspeed.initialize`` over our model and torch optimizer;
* :mod:`.state`: checkpoints in DeepSpeed's own layout, the gathered fp32 model/optimizer state, the EMA over ZeRO
  partitions, and the only reads of DeepSpeed internals (each in one function, checked by a test).

:data:`DEEPSPEED_RANGE` is the DeepSpeed versions the tests pass on (0.19.8; 0.19.0 and 0.19.4 fail them); the
``deepspeed`` extra of setup.py says the same, and the engine refuses others.
"""
DEEPSPEED_RANGE = ">=0.19.8,<0.20"

_LAZY = {"DeepSpeedEngine": "engine", "check_version": "engine", "build_config": "config",
         "config_for_job": "config", "generate_config": "config", "load_user_config": "config",
         "merge_user_config": "config", "validate_config": "config"}


def __getattr__(name):
    """Lazy re-exports: ``import usp_scale.engine.deepspeed`` imports neither torch nor deepspeed."""
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEEPSPEED_RANGE", *_LAZY]
