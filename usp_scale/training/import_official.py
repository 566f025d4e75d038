"""Continue an official MAE/USP pretraining run here: its ``checkpoint-N.pth`` becomes a step folder of a run.

:func:`import_official_mae` builds the run the config describes (the trainer itself, on the ``local`` engine in one
process: the same run folder, loader, optimizer groups, schedule and checkpoint format as training), loads the
official weights strictly, re-keys the official optimizer's moments onto our groups by parameter name
(:mod:`usp_scale.checkpoint.official_mae`), takes over the fp16 loss scale, and saves a checkpoint at the start of the
epoch after the official one: ``epoch = N + 1``, ``step = (N + 1) x steps per epoch``. The LR schedule is a function
of the step and the config, so the continued run's learning rate is the official schedule's at that epoch.

A checkpoint of the local engine resumes on the local, ddp and fsdp2 engines at any world size (DCP reshards it); a
DeepSpeed run resumes only from its own checkpoints, so a DeepSpeed config is refused here.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

from ..checkpoint.official_mae import (ARGS_COMPARED, OfficialImportError, official_hyperparameters,
                                       official_mae_param_names, optimizer_state_from_official, read_official_mae)
from ..config import load_config
from ..transfer.formats import load_weights
from .rundir import unlock_run_dir
from .trainer import Trainer

# the config keys an official arg corresponds to (for the log: the continued run follows the config)
_ARG_KEYS = {"epochs": "schedule.epochs", "blr": "optim.blr", "lr": "optim.lr", "min_lr": "optim.min_lr",
             "warmup_epochs": "schedule.warmup_epochs", "weight_decay": "optim.weight_decay",
             "mask_ratio": "mask.ratio", "norm_pix_loss": "model.norm_pix_loss"}


def _config_value(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def compare_args(args: dict, cfg) -> list:
    """Lines naming the official run's settings that differ from the config the run continues under."""
    lines = []
    for k in ARGS_COMPARED:
        if k not in args or k not in _ARG_KEYS:
            continue
        ours = _config_value(cfg, _ARG_KEYS[k])
        theirs = args[k]
        if ours is None or theirs is None:
            continue
        if isinstance(ours, float) or isinstance(theirs, float):
            same = math.isclose(float(ours), float(theirs), rel_tol=1e-9, abs_tol=0.0)
        else:
            same = ours == theirs
        if not same:
            lines.append(f"  {_ARG_KEYS[k]}: official run {theirs!r}, this config {ours!r}")
    return lines


def import_official_mae(recipe: Optional[str], overrides: Sequence[str], path: str, log=print) -> dict:
    """Write the official pretraining checkpoint ``path`` as the first step folder of the run that ``recipe`` +
    ``overrides`` describe (its ``output_dir``, which must hold no checkpoint yet). Returns a summary (step, epoch,
    folder, what was carried over)."""
    ck = read_official_mae(path)
    cfg = load_config(recipe, list(overrides))
    if cfg.task != "pretrain":
        raise OfficialImportError(f"the config's task is {cfg.task!r}: an official pretraining checkpoint continues "
                                  "a task=pretrain run (a pretraining recipe, e.g. configs/pretrain/usp_base_224.yaml)")
    if cfg.engine.name == "deepspeed":
        raise OfficialImportError("engine.name=deepspeed: the import writes a DCP checkpoint, which the local, ddp "
                                  "and fsdp2 engines resume (DeepSpeed resumes only its own); continue with "
                                  "engine.name=ddp or fsdp2")
    epoch = ck["epoch"] + 1
    if epoch >= cfg.schedule.epochs:
        raise OfficialImportError(f"{path}: the official run finished epoch {ck['epoch']} (0-based), and "
                                  f"schedule.epochs={cfg.schedule.epochs} leaves nothing to train: set schedule.epochs "
                                  f"above {epoch} (e.g. schedule.epochs=1600 to continue an 800-epoch run)")
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    if os.path.isdir(ckpt_dir) and any(n.startswith("step_") for n in os.listdir(ckpt_dir)):
        raise OfficialImportError(f"{ckpt_dir} already holds checkpoints: import into a new output_dir")
    engine_name = cfg.engine.name
    # one process, the local engine, no resume (nothing to resume), no compile (nothing runs)
    cfg = load_config(recipe, list(overrides) + ["engine.name=local", "checkpoint.resume=", "engine.compile=false"])
    trainer = Trainer(cfg)
    try:
        model = trainer.engine.unwrapped
        load_weights(model, path, state_dict=ck["model"])   # strict: names both sides' extra keys
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        groups = official_mae_param_names(ck["model"], trainable)
        opt = trainer.engine.optimizer
        opt.load_state_dict(optimizer_state_from_official(ck["optimizer"], groups, opt.state_dict(), shapes,
                                                          source=path))
        carried = ["model (strict)", f"optimizer moments of {sum(len(g) for g in groups)} parameters "
                   "(official groups [no decay, decay] matched by name)"]
        scaler = trainer.engine.scaler
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
            carried.append(f"fp16 loss scale {scaler.get_scale():g}")
        elif ck.get("scaler"):
            carried.append(f"not the loss scale: engine.precision={cfg.engine.precision} trains without one")
        if trainer.ema is not None:   # the official MAE keeps no EMA: it starts at the imported weights
            trainer.ema.load_state_dict({n: t.detach().float() for n, t in trainer.engine.weights.ema_sources()})
            carried.append("EMA started at the imported weights (the official run keeps none)")
        st = trainer.state
        st.epoch, st.micro_in_epoch = epoch, 0
        st.step = epoch * trainer.steps_per_epoch
        if st.step >= trainer.schedule.total_steps:
            raise OfficialImportError(f"step {st.step} (epoch {epoch} x {trainer.steps_per_epoch} steps) is past the "
                                      f"schedule's {trainer.schedule.total_steps} steps: raise schedule.epochs")
        for line in [f"[usp_scale] import {path}: official epoch {ck['epoch']} done -> this run continues at epoch "
                     f"{epoch}, step {st.step} ({trainer.steps_per_epoch} steps per epoch of {trainer.global_batch})",
                     "[usp_scale] carried over: " + "; ".join(carried),
                     "[usp_scale] official optimizer groups: " + str(official_hyperparameters(ck["optimizer"])) +
                     " (the continued run uses the config's hyper-parameters; the lr follows its schedule)"]:
            log(line)
        diffs = compare_args(ck["args"], cfg)
        if diffs:
            log("[usp_scale] the official run's settings that this config changes:\n" + "\n".join(diffs))
        folder = trainer._save()
    finally:
        trainer.close()
        unlock_run_dir(cfg.output_dir)
    log(f"[usp_scale] continue with the same recipe and output_dir={cfg.output_dir} (engine.name={engine_name}); "
        "it resumes from this folder")
    return {"checkpoint": folder, "step": st.step, "epoch": epoch, "steps_per_epoch": trainer.steps_per_epoch,
            "carried": carried, "changed": diffs}
