"""The run's exports at the end of training: model-only safetensors (+ the EMA's) and the official-format file the
task declares (``Task.official_keys`` / ``Task.official_name``: {"model"} for the MAE, {"model", "ema", "opt",
"args"} for DiT/SiT, {"model", "args"} for the classifiers). Collective: the engine's weights part gathers the full
tensors (:class:`usp_scale.engine.base.Weights`), rank 0 writes.
"""
from __future__ import annotations

import os

from .. import runtime as D
from ..checkpoint import save_official
from ..config import to_dict
from ..fileio import save_safetensors


class Exporter:
    """Writes ``<output_dir>/export/`` for ``cfg`` and its ``task`` (``checkpoint.export``,
    ``checkpoint.export_official``, ``ema.export_ema``)."""

    def __init__(self, cfg, task, is_main: bool):
        self.cfg, self.task, self.is_main = cfg, task, is_main

    def export(self, weights, ema, step: int) -> dict:
        """Exports of the weights (the engine's :class:`~usp_scale.engine.base.Weights`) and ``ema`` at ``step``;
        returns {"model", "ema", "official"} -> path (those written). Collective."""
        cfg, keys = self.cfg, self.task.official_keys
        out = {}
        if not (cfg.checkpoint.export or cfg.checkpoint.export_official):
            return out
        model_sd = weights.full_model_state_dict()
        ema_sd = None if ema is None else weights.full_ema_state_dict(ema.state_dict(), model_sd)
        official = cfg.checkpoint.export_official
        opt_sd = weights.full_optimizer_state_dict() if official and "opt" in keys else None
        if self.is_main:
            exp = os.path.join(cfg.output_dir, "export")
            os.makedirs(exp, exist_ok=True)
            meta = {"task": cfg.task, "model": cfg.model.name, "step": step}
            if cfg.checkpoint.export:
                out["model"] = save_safetensors(model_sd, os.path.join(exp, "model.safetensors"), meta)
                if ema_sd is not None and cfg.ema.export_ema:
                    out["ema"] = save_safetensors(ema_sd, os.path.join(exp, "ema.safetensors"), meta)
            if official and "ema" in keys and ema_sd is None:
                print("[usp_scale] no official export: its format holds the EMA and ema.decay is 0", flush=True)
            elif official:
                parts = {"model": model_sd, "ema": ema_sd, "opt": opt_sd, "args": to_dict(cfg)}
                out["official"] = save_official(os.path.join(exp, self.task.official_name.format(step=step)),
                                                {k: parts[k] for k in keys})
        D.barrier()
        return out
