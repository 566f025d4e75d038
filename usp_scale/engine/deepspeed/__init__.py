"""DeepSpeed ZeRO-1/2/3 as one adapter behind :class:`usp_scale.engine.base.Engine` (the one place that imports
deepspeed, and only when a DeepSpeed engine is built or its JSON validated):

* :mod:`.config`: the DeepSpeed JSON generated from our config, a user JSON merged over it and validated;
* :mod:`.engine`: :class:`~.engine.DeepSpeedEngine`, ``deepspeed.initialize`` over our model and torch optimizer;
* :mod:`.state`: the engine's two parts (the EMA over ZeRO partitions and the gathered fp32 state; checkpoints in
  DeepSpeed's own layout), and the only reads of DeepSpeed internals (each in one function, checked by a test).

:data:`DEEPSPEED_RANGE` is the DeepSpeed versions the tests pass on (0.19.8; 0.19.0 and 0.19.4 fail them); the
``deepspeed`` extra of setup.py says the same, and the engine refuses others.
"""
DEEPSPEED_RANGE = ">=0.19.8,<0.20"
