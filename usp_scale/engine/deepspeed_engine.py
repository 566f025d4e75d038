"""Old import path of the DeepSpeed engine; it lives in :mod:`usp_scale.engine.deepspeed`."""
from .deepspeed.config import generate_config, load_user_config, merge_user_config  # noqa: F401
from .deepspeed.engine import DeepSpeedEngine  # noqa: F401
