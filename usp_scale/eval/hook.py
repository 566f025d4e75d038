"""In-training FID for the dit/sit tasks, in one module: the distributed FID of a model's samples
(:func:`evaluate_fid`), a sample grid (:func:`save_sample_grid`) and the training hook (:class:`FIDHook`,
:func:`build_fid_hook`) that runs them every ``eval.fid_every`` optimizer steps (and at the end), logged with
the training metrics and in ``eval.metrics_file``.

Every rank samples its share of indices (rank, rank + W, ...), so the sample set is the same for any world
size; ranks all-reduce the feature sums (float64) and rank 0 computes FID, which is broadcast. Work that can
fail on one rank only is followed by a collective status check (:func:`agree_on_success`), so a failure stops
every rank with the failing rank's error instead of a collective timeout.

Randomness is explicit: each sample index owns a ``torch.Generator`` seeded from (``eval.seed``, index)
(:class:`usp_scale.sample.IndexedNoise`), and the modules the evaluation needs (the feature extractor, the
VAE) are built once, when the hook is built at start-up (before the trainer seeds its training streams). An
evaluation therefore draws nothing from the global generators: training noise and an exact resume are the
same whether (or when) FID ran.

Settings not given (a dict ``cfg``) take the defaults of :class:`usp_scale.config.schema.EvalConfig`.
Importing this module needs no torch-fidelity (the optional ``eval`` extra): the metrics and extractors load
when an evaluation is built.
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from .. import runtime as D
from ..config import ConfigError
from ..config.schema import EvalConfig
from ..engine.fsdp import is_meta
from ..fileio import truncate_jsonl, write_text
from ..runtime import agree_on_success, get_rank, get_world_size
from ..sample import (build_sampler, generate_batches, infer_latent_shape, infer_num_classes, make_decoder, make_grid,
                      make_model_fn, write_png)
from ..vae import FrozenVAE

_DEFAULTS = EvalConfig()


def _get(cfg, name):
    """``cfg.name`` (an EvalConfig or a dict); a key a dict leaves out takes EvalConfig's default."""
    if isinstance(cfg, dict):
        return cfg[name] if name in cfg else getattr(_DEFAULTS, name)
    return getattr(_DEFAULTS if cfg is None else cfg, name)


def _interval(cfg):
    lo, hi = _get(cfg, "cfg_interval_low"), _get(cfg, "cfg_interval_high")
    return (float(lo), float(hi)) if lo <= hi else None


def build_extractor(cfg, device):
    """(extractor, layer) for FID from ``cfg.feature_extractor`` / ``cfg.inception_weights`` under the protocol of
    ``cfg.protocol`` (:func:`usp_scale.eval.metrics.fid_extractor`: also checks the reference statistics fit)."""
    from .metrics import fid_extractor

    return fid_extractor(_get(cfg, "feature_extractor"), _get(cfg, "inception_weights") or None, device,
                         _get(cfg, "protocol"), _get(cfg, "fid_reference") or None)


def truncate_eval_records(path: str, step: int) -> int:
    """On resume at ``step``: drop the records past ``step`` from the eval package's JSON-lines file ``path``
    (``eval.metrics_file``) and rewrite its readable ``.txt`` companion from the records kept. Rank 0 only;
    returns #dropped."""
    dropped = truncate_jsonl(path, step)
    txt = os.path.splitext(path)[0] + ".txt"
    if dropped and os.path.isfile(txt):
        from .metrics import format_record  # torch-fidelity: only when FID records exist
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        write_text(txt, "".join(format_record(r) + "\n" for r in recs))
    return dropped


def check_eval_config(cfg, process) -> None:
    """Start-up checks of the ``eval`` section when in-training FID is on: what needs files or the task's process
    (every rule of the values themselves was checked when the config loaded, :mod:`usp_scale.config.validate`);
    raises ConfigError naming the key."""
    e = cfg.eval
    if not os.path.exists(e.fid_reference):
        raise ConfigError(f"eval.fid_reference={e.fid_reference}: not found. Give a folder of images, an image "
                          ".npz (arr_0) or a statistics .npz (mu, sigma); e.g. launchers/evaluate.py --save-stats "
                          "writes one from a folder")
    from .features import INCEPTION_NAME, default_layer, resolve_inception_weights

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
    try:
        build_sampler(e.sampler, process, e.steps, eta=e.ddim_eta, timestep_shift=e.timestep_shift)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"eval.sampler={e.sampler!r} for task={cfg.task}: {err}") from None


def _frozen_vae(cfg, loader, device):
    """The data path's FrozenVAE (the online loader's own instance when it has one), else one from cfg.vae
    (a seeded random VAE is built from its own seed: :mod:`usp_scale.vae.frozen`)."""
    vae = getattr(loader, "vae", None)
    if isinstance(vae, FrozenVAE):
        return vae
    return FrozenVAE.from_config(cfg.vae, device=device)


class FIDHook:
    """FID + sample grid every ``eval.fid_every`` steps; build with :func:`build_fid_hook`."""

    def __init__(self, cfg, process, model: nn.Module, vae, device, grid_num: int = 16):
        self.cfg, self.process, self.vae = cfg, process, vae
        self.device = torch.device(device)
        self.grid_num = grid_num
        # Built once, here (start-up), so that no evaluation constructs a module (which draws from the global
        # generator) in the middle of training; kept on the CPU between evaluations.
        try:
            extractor, self.layer = build_extractor(cfg.eval, "cpu")
        except (ValueError, KeyError, OSError, RuntimeError) as err:   # bad weights, reference or protocol
            raise ConfigError(f"eval.feature_extractor={cfg.eval.feature_extractor!r} / eval.inception_weights / "
                              f"eval.fid_reference / eval.protocol: {err}") from None
        self.extractor = extractor.requires_grad_(False).eval()
        # A private, never-wrapped copy (CPU between evaluations): engines shard/wrap the training module. A model
        # built on the meta device (initialised after sharding) gets memory here; every evaluation loads the weights.
        copied = copy.deepcopy(model)
        copied = copied.to_empty(device="cpu") if is_meta(copied) else copied.to("cpu")
        self.model = copied.requires_grad_(False).eval()
        self.records_file = os.path.join(cfg.output_dir, cfg.eval.metrics_file)
        self.grid_dir = os.path.join(cfg.output_dir, "samples")
        self.last_step = -1

    def due(self, step: int, total: int) -> bool:
        """Every ``eval.fid_every`` optimizer steps and at the last step, once per step."""
        return step != self.last_step and (step % self.cfg.eval.fid_every == 0 or step == total)

    def catch_up(self, engine, ema, step: int, epoch: int, total: int, logger, progress: bool = False):
        """After a resume at ``step``: run the evaluation due at ``step`` if metrics.jsonl has none (the
        checkpoint is written first, so a job stopped during FID resumes here). Collective."""
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
        weights = engine.weights  # full on rank 0 at least
        sd = weights.full_model_state_dict() if ema is None else weights.full_ema_state_dict(ema.state_dict())
        which = "model" if ema is None else "ema"
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
            for t in self.model.state_dict().values():
                dist.broadcast(t, 0)
        return which

    def __call__(self, engine, ema, step: int, epoch: int, logger=None, progress: bool = False) -> dict:
        """Evaluate at ``step`` (collective). Returns the metrics.jsonl record (on every rank)."""
        e = self.cfg.eval
        t0 = time.perf_counter()
        self.last_step = step
        rank = D.get_rank()
        try:
            weights = self._load_weights(engine, ema)
            self.extractor.to(self.device)
            res = evaluate_fid(self.model, self.process, self.vae, e, e.fid_samples, device=self.device,
                               step=step, records_file=self.records_file, progress=progress,
                               extractor=(self.extractor, self.layer))
            grid = os.path.join(self.grid_dir, f"step_{step:07d}.png")
            err = None
            try:  # rank-0 work: the sample grid and the metrics record
                if rank == 0:  # the same indices (noise and labels) every time: comparable grids
                    save_sample_grid(self.model, self.process, self.vae, e, grid, num=self.grid_num,
                                     device=self.device)
                rec = {"kind": "eval", "step": step, "epoch": epoch, "metric": "fid", "fid": res["fid"],
                       "protocol": res["protocol"],
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
            self.extractor.to("cpu")
        if rank == 0:
            print(f"[usp_scale] eval step {step}: fid {rec['fid']:.4f} ({rec['num_samples']} samples, {rec['sampler']} "
                  f"{rec['sampling_steps']} steps, {weights} weights, {rec['eval_seconds']:.1f} s); grid {grid}",
                  flush=True)
        return rec


def build_fid_hook(cfg, task, model: nn.Module, loader, device) -> Optional[FIDHook]:
    """The hook for a generative task (``task.process``: dit/sit) with ``eval.fid_every > 0`` (None otherwise). Call
    before the engine wraps ``model``; checks the eval files (reference, feature extractor weights) and the sampler
    now, not N steps later."""
    if cfg.eval.fid_every <= 0:
        return None
    check_eval_config(cfg, task.process)  # a generative task (a rule of the config): its process samples
    return FIDHook(cfg, task.process, model, _frozen_vae(cfg, loader, device), device)


@torch.no_grad()
def evaluate_fid(model, diffusion_or_transport, vae, cfg, num_samples: int, *, reference: Optional[str] = None,
                 device=None, latent_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
                 latent_scale: Optional[float] = None, cache_dir: Optional[str] = None,
                 records_file: Optional[str] = None, step: Optional[int] = None, progress: bool = False,
                 extractor=None) -> dict:
    """FID of ``num_samples`` generated images against ``reference`` (default ``cfg.fid_reference``).

    ``cfg`` is the EvalConfig section (or a dict) giving sampler, steps, cfg_scale, cfg_interval_low/high,
    cfg_channels, ddim_eta, batch_size, precision, seed, feature_extractor, inception_weights.
    ``vae`` decodes model-space latents (see :func:`usp_scale.sample.make_decoder`; None = pixel-space
    model). Returns {fid, num_samples, sampler, steps, cfg_scale, sampling_precision, reference,
    feature_extractor, protocol, seconds} on every rank (``protocol``: ``cfg.protocol`` resolved as
    :func:`usp_scale.eval.metrics.resolve_protocol` does). The model is put in eval mode and restored after.
    With ``records_file`` rank 0 also appends the FID record (with ``step``) there (JSON lines + .txt).
    ``extractor``: a ``(extractor, layer)`` pair from :func:`build_extractor` to reuse (the hook builds it once);
    by default one is built from ``cfg``.

    Distributed: collective; a rank may have no samples (``num_samples`` < world size). A failure on any
    rank (setup, sampling, reference or record writing on rank 0) raises :class:`DistributedEvalError` on
    every rank instead of leaving the others waiting in a collective (:func:`agree_on_success`)."""
    t0 = time.perf_counter()
    from .metrics import (frechet_distance, is_stats_file, make_records, read_reference_statistics, reference_features,
                          resolve_protocol, statistics, write_records)

    reference = reference or _get(cfg, "fid_reference")
    if not reference:
        raise ValueError("in-training FID needs a reference: set eval.fid_reference to a folder, an image .npz "
                         "or a statistics .npz (mu, sigma)")
    rank, world = get_rank(), get_world_size()
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    sampler_kind = _get(cfg, "sampler")
    steps = int(_get(cfg, "steps"))
    cfg_scale = float(_get(cfg, "cfg_scale"))
    interval = _interval(cfg)
    precision = _get(cfg, "precision")
    batch_size = int(_get(cfg, "batch_size"))
    extractor_name = _get(cfg, "feature_extractor")
    protocol = resolve_protocol(_get(cfg, "protocol"), extractor_name, reference)
    what = f"FID ({num_samples} samples{f', step {step}' if step is not None else ''})"

    err = None
    try:  # set-up (may fail on one rank only, e.g. out of memory)
        latent_shape = tuple(latent_shape or infer_latent_shape(model))
        num_classes = int(num_classes if num_classes is not None else infer_num_classes(model))
        sampler = build_sampler(sampler_kind, diffusion_or_transport, steps, eta=float(_get(cfg, "ddim_eta")),
                                timestep_shift=float(_get(cfg, "timestep_shift")))
        model_fn = make_model_fn(model, num_classes=num_classes, cfg_scale=cfg_scale,
                                 cfg_channels=int(_get(cfg, "cfg_channels")), interval=interval,
                                 precision=precision)
        decode = make_decoder(vae, latent_scale) if vae is not None else make_decoder(None)
        extractor, layer = extractor if extractor is not None else build_extractor(cfg, device)
    except Exception as e:  # noqa: BLE001 -- agreed over ranks, re-raised below
        err = e
    agree_on_success(err, what + ": set-up")

    was_training = model.training
    model.eval()
    indices = list(range(rank, num_samples, world))
    s1, s2, n = None, None, 0
    try:
        bar = None
        if progress and rank == 0:
            bar = tqdm(total=len(indices), unit="img", desc="fid samples", leave=False)
        for _, images, _ in generate_batches(model_fn, sampler, decode, indices,
                                             seed=int(_get(cfg, "seed")), latent_shape=latent_shape,
                                             num_classes=num_classes, batch_size=batch_size, device=device,
                                             progress_bar=bar):
            x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
            f = extractor.convert_features_tuple_to_dict(extractor(x))[layer].double()  # (n, D)
            s1 = f.sum(0) if s1 is None else s1 + f.sum(0)
            s2 = f.T @ f if s2 is None else s2 + f.T @ f
            n += f.shape[0]
        if s1 is None:  # this rank had no indices; contribute zeros of the right size
            d = extractor.convert_features_tuple_to_dict(
                extractor(torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device)))[layer].shape[1]
            s1 = torch.zeros(d, dtype=torch.float64, device=device)
            s2 = torch.zeros(d, d, dtype=torch.float64, device=device)
        if bar is not None:
            bar.close()
    except Exception as e:  # noqa: BLE001
        err = e
    finally:
        model.train(was_training)
    agree_on_success(err, what + ": sampling and features")
    count = torch.tensor([float(n)], dtype=torch.float64, device=device)
    if world > 1:
        for t in (s1, s2, count):
            torch.distributed.all_reduce(t)
    desc = sampler.describe()
    out = {"fid": float("nan"), "num_samples": int(count.item()), "sampler": desc["sampler"],
           "steps": desc["steps"], "cfg_scale": cfg_scale, "sampling_precision": precision,
           "reference": str(reference), "feature_extractor": extractor_name, "protocol": protocol}
    if step is not None:
        out["step"] = int(step)
    fid = torch.zeros(1, dtype=torch.float64, device=device)
    if rank == 0:
        try:
            N = count.item()
            mu = (s1 / N).cpu().numpy()
            sigma = ((s2 - N * torch.outer(s1 / N, s1 / N)) / (N - 1)).cpu().numpy()
            if isinstance(reference, str) and is_stats_file(reference):
                ref_stats = read_reference_statistics(reference)
            else:
                ref = reference_features(reference, extractor, extractor_name, batch_size, device, cache_dir,
                                         progress=progress)
                ref_stats = statistics(ref[layer])
            fid[0] = frechet_distance({"mu": mu, "sigma": sigma}, ref_stats, protocol, ("samples", str(reference)))
            if records_file:
                context = {k: v for k, v in out.items() if k not in ("fid", "num_samples")}
                context["seconds"] = time.perf_counter() - t0
                write_records(records_file, make_records({"fid": float(fid.item()), "num_samples": out["num_samples"]},
                                                         context))
        except Exception as e:  # noqa: BLE001
            err = e
    agree_on_success(err, what + ": FID on rank 0")
    if world > 1:
        torch.distributed.broadcast(fid, 0)
    out["fid"] = float(fid.item())
    out["seconds"] = time.perf_counter() - t0
    return out


@torch.no_grad()
def save_sample_grid(model, diffusion_or_transport, vae, cfg, path: str, num: int = 16, *, device=None,
                     latent_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
                     latent_scale: Optional[float] = None) -> str:
    """Sample ``num`` images (indices 0..num-1 of ``cfg.seed``, so the same noise and labels every call) and
    write them as one grid PNG at ``path``; for watching a run's EMA model between FID evaluations."""
    if device is None:
        device = next(model.parameters()).device
    latent_shape = tuple(latent_shape or infer_latent_shape(model))
    num_classes = int(num_classes if num_classes is not None else infer_num_classes(model))
    sampler = build_sampler(_get(cfg, "sampler"), diffusion_or_transport, int(_get(cfg, "steps")),
                            eta=float(_get(cfg, "ddim_eta")), timestep_shift=float(_get(cfg, "timestep_shift")))
    model_fn = make_model_fn(model, num_classes=num_classes, cfg_scale=float(_get(cfg, "cfg_scale")),
                             cfg_channels=int(_get(cfg, "cfg_channels")), interval=_interval(cfg),
                             precision=_get(cfg, "precision"))
    decode = make_decoder(vae, latent_scale) if vae is not None else make_decoder(None)
    was_training = model.training
    model.eval()
    try:
        ims = [b for _, b, _ in generate_batches(model_fn, sampler, decode, list(range(num)),
                                                 seed=int(_get(cfg, "seed")), latent_shape=latent_shape,
                                                 num_classes=num_classes, batch_size=int(_get(cfg, "batch_size")),
                                                 device=device)]
    finally:
        model.train(was_training)
    images = np.concatenate(ims)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_png(path, make_grid(images, nrow=int(np.ceil(np.sqrt(len(images))))))
    return path
