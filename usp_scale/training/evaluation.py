"""In-training generative evaluation for the dit/sit tasks: FID every ``eval.fid_every`` optimizer steps
(and at the end) plus a sample-grid PNG, logged with the training metrics.

The hook keeps a plain, never-wrapped copy of the model (made before the engine shards or wraps it). At
each evaluation it fills that copy with the full, unsharded weights the engine exposes (the EMA when
``ema.decay > 0``, else the model; collective on every engine), broadcasts them from rank 0, samples
on every rank (indices sharded by rank, :func:`usp_scale.eval.evaluate_fid`) and decodes with the same
frozen VAE the data path uses. Everything runs under ``torch.random.fork_rng``: training noise and an
exact resume are unaffected by whether (or when) FID ran.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Optional

import torch
import torch.nn as nn

from ..config import ConfigError

GENERATIVE_TASKS = ("dit", "sit")


def _isolated_rng(device: torch.device):
    devices = [device] if device.type == "cuda" and torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def truncate_eval_records(path: str, step: int) -> int:
    """On resume at ``step``: drop the records past ``step`` from the eval package's JSON-lines file ``path``
    (``eval.metrics_file``) and rewrite its readable ``.txt`` companion from the records kept. Rank 0 only;
    returns #dropped."""
    import json

    from .logging import truncate_jsonl

    dropped = truncate_jsonl(path, step)
    txt = os.path.splitext(path)[0] + ".txt"
    if dropped and os.path.isfile(txt):
        from ..eval.metrics import format_record  # torch-fidelity: only when FID records exist
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        with open(txt + ".tmp", "w") as f:
            f.writelines(format_record(r) + "\n" for r in recs)
        os.replace(txt + ".tmp", txt)
    return dropped


def check_eval_config(cfg, process) -> None:
    """Start-up checks of the ``eval`` section when in-training FID is on; raises ConfigError naming the key."""
    e = cfg.eval
    if e.fid_samples < 2:
        raise ConfigError(f"eval.fid_samples={e.fid_samples}: FID needs at least 2 samples (a covariance)")
    if not e.fid_reference:
        raise ConfigError(f"eval.fid_every={e.fid_every} needs a reference: set eval.fid_reference to a folder of "
                          "images, an image .npz (arr_0) or a statistics .npz (mu, sigma), or eval.fid_every=0")
    if not os.path.exists(e.fid_reference):
        raise ConfigError(f"eval.fid_reference={e.fid_reference}: not found. Give a folder of images, an image "
                          ".npz (arr_0) or a statistics .npz (mu, sigma); e.g. launchers/evaluate.py --save-stats "
                          "writes one from a folder")
    from ..eval import INCEPTION_NAME, default_layer, resolve_inception_weights

    if e.feature_extractor == INCEPTION_NAME:
        try:
            resolve_inception_weights(e.inception_weights or None)
        except FileNotFoundError as err:
            raise ConfigError(f"eval.inception_weights={e.inception_weights!r}: {err}") from None
    else:
        try:
            default_layer(e.feature_extractor, "fid")
        except KeyError as err:
            raise ConfigError(f"eval.feature_extractor={e.feature_extractor!r}: {err.args[0]}") from None
    if e.precision not in ("fp32", "bf16"):
        raise ConfigError(f"eval.precision={e.precision!r}: use fp32 or bf16")
    if e.steps < 1 or e.batch_size < 1:
        raise ConfigError(f"eval.steps={e.steps} and eval.batch_size={e.batch_size} must be >= 1")
    from ..sample import build_sampler

    try:
        build_sampler(e.sampler, process, e.steps, eta=e.ddim_eta)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"eval.sampler={e.sampler!r} for task={cfg.task}: {err}") from None


def _frozen_vae(cfg, loader, device):
    """The data path's FrozenVAE (the online loader's own instance when it has one), else one from cfg.vae."""
    from ..vae import FrozenVAE

    vae = getattr(loader, "vae", None)
    if isinstance(vae, FrozenVAE):
        return vae
    with _isolated_rng(torch.device(device)):  # tiny-random VAEs are initialised from a seed
        return FrozenVAE.from_config(cfg.vae, device=device)


class FIDHook:
    """FID + sample grid every ``eval.fid_every`` steps; build with :func:`build_fid_hook`."""

    def __init__(self, cfg, process, model: nn.Module, vae, device, grid_num: int = 16):
        self.cfg, self.process, self.vae = cfg, process, vae
        self.device = torch.device(device)
        self.grid_num = grid_num
        # A private, never-wrapped copy (CPU between evaluations): engines shard/wrap the training module.
        self.model = copy.deepcopy(model).to("cpu").requires_grad_(False).eval()
        self.records_file = os.path.join(cfg.output_dir, cfg.eval.metrics_file)
        self.grid_dir = os.path.join(cfg.output_dir, "samples")
        self.last_step = -1

    def due(self, step: int, total: int) -> bool:
        """Every ``eval.fid_every`` optimizer steps and at the last step, once per step."""
        return step != self.last_step and (step % self.cfg.eval.fid_every == 0 or step == total)

    def catch_up(self, engine, ema, step: int, epoch: int, total: int, logger, progress: bool = False):
        """After a resume at ``step``: run the evaluation due at ``step`` if metrics.jsonl has none (the
        checkpoint is written first, so a job stopped during FID resumes here). Collective."""
        from ..engine import dist as D

        if step <= 0 or not self.due(step, total):
            return None
        done = any(r.get("kind") == "eval" and r.get("metric") == "fid" and r.get("step") == step
                   for r in logger.read_all()) if D.get_rank() == 0 else True
        if D.all_reduce_max(float(not done)) == 0.0:
            return None
        if D.get_rank() == 0:  # killed between the two record writes: the redone evaluation replaces its record
            truncate_eval_records(self.records_file, step - 1)
        return self(engine, ema, step, epoch, logger, progress=progress)

    @torch.no_grad()
    def _load_weights(self, engine, ema) -> str:
        """Full weights (EMA over the model's) into the private copy on every rank; collective."""
        from ..engine import dist as D
        from ..eval import agree_on_success

        sd = engine.full_model_state_dict()  # full on rank 0 at least
        which = "model"
        if ema is not None:
            sd = {**sd, **engine.gather_ema(ema.state_dict())}
            which = "ema"
        rank, world = D.get_rank(), D.get_world_size()
        err = None
        if rank == 0:
            try:
                missing, unexpected = self.model.load_state_dict(sd, strict=False)
                if missing or unexpected:
                    raise RuntimeError(f"in-training FID: the engine's weights do not match the model (missing "
                                       f"{missing[:5]}, unexpected {unexpected[:5]})")
            except Exception as e:  # noqa: BLE001 -- agreed over ranks, re-raised below
                err = e
        del sd
        agree_on_success(err, "in-training FID: loading the engine's weights on rank 0")
        self.model.to(self.device)
        if world > 1:
            import torch.distributed as dist

            for t in self.model.state_dict().values():
                dist.broadcast(t, 0)
        return which

    def __call__(self, engine, ema, step: int, epoch: int, logger=None, progress: bool = False) -> dict:
        """Evaluate at ``step`` (collective). Returns the metrics.jsonl record (on every rank)."""
        from ..engine import dist as D
        from ..eval import agree_on_success, evaluate_fid, save_sample_grid

        e = self.cfg.eval
        t0 = time.perf_counter()
        self.last_step = step
        rank = D.get_rank()
        with _isolated_rng(self.device):
            try:
                weights = self._load_weights(engine, ema)
                res = evaluate_fid(self.model, self.process, self.vae, e, e.fid_samples, device=self.device,
                                   step=step, records_file=self.records_file, progress=progress)
                grid = os.path.join(self.grid_dir, f"step_{step:07d}.png")
                err = None
                try:  # rank-0 work: the sample grid and the metrics record
                    if rank == 0:  # the same indices (noise and labels) every time: comparable grids
                        save_sample_grid(self.model, self.process, self.vae, e, grid, num=self.grid_num,
                                         device=self.device)
                    rec = {"kind": "eval", "step": step, "epoch": epoch, "metric": "fid", "fid": res["fid"],
                           "num_samples": res["num_samples"], "sampler": res["sampler"],
                           "sampling_steps": res["steps"], "cfg_scale": res["cfg_scale"],
                           "sampling_precision": res["sampling_precision"], "reference": res["reference"],
                           "feature_extractor": res["feature_extractor"], "weights": weights, "grid": grid,
                           "eval_seconds": time.perf_counter() - t0}
                    if logger is not None:
                        logger.log(rec)
                except Exception as ex:  # noqa: BLE001 -- agreed over ranks, re-raised below
                    err = ex
                agree_on_success(err, f"in-training FID at step {step}: sample grid / metrics record on rank 0")
            finally:
                self.model.to("cpu")
        if rank == 0:
            print(f"[usp_scale] eval step {step}: fid {rec['fid']:.4f} ({rec['num_samples']} samples, {rec['sampler']} "
                  f"{rec['sampling_steps']} steps, {weights} weights, {rec['eval_seconds']:.1f} s); grid {grid}",
                  flush=True)
        return rec


def build_fid_hook(cfg, task, model: nn.Module, loader, device) -> Optional[FIDHook]:
    """The hook for dit/sit with ``eval.fid_every > 0`` (None otherwise). Call before the engine wraps
    ``model``; checks the eval settings (reference, feature extractor weights, sampler) now, not N steps later."""
    if cfg.eval.fid_every <= 0:
        return None
    if cfg.task not in GENERATIVE_TASKS:
        raise ConfigError(f"eval.fid_every={cfg.eval.fid_every}: in-training FID is for task=dit or sit, "
                          f"not task={cfg.task}; set eval.fid_every=0")
    attr = "diffusion" if cfg.task == "dit" else "transport"
    process = getattr(task, attr, None)
    if process is None:
        raise ConfigError(f"eval.fid_every={cfg.eval.fid_every}: task object {type(task).__name__} has no "
                          f"'{attr}' to sample with")
    check_eval_config(cfg, process)
    return FIDHook(cfg, process, model, _frozen_vae(cfg, loader, device), device)
