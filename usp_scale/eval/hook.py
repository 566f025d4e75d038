"""In-training FID: sample with the (EMA) model, decode, extract features, compare with a reference.

Every rank samples its share of indices (rank, rank + W, ...), so the sample set is the same
for any world size; ranks all-reduce the feature sums (float64) and rank 0 computes FID, which
is broadcast. Nothing is written to disk except the reference cache (and ``records_file`` when given).
Work that can fail on one rank only is followed by a collective status check (:func:`agree_on_success`),
so a failure stops every rank with the failing rank's error instead of a collective timeout.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import numpy as np
import torch

from ..engine.dist import get_rank, get_world_size
from ..sample import build_sampler, generate_batches, infer_latent_shape, infer_num_classes, make_decoder, \
    make_model_fn
from .agree import DistributedEvalError, agree_on_success  # noqa: F401 (re-exported)
from .features import create_extractor, default_layer
from .metrics import frechet_distance, is_stats_file, make_records, reference_features, statistics, write_records


def _get(cfg, name, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


@torch.no_grad()
def evaluate_fid(model, diffusion_or_transport, vae, cfg, num_samples: int, *, reference: Optional[str] = None,
                 device=None, latent_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
                 latent_scale: Optional[float] = None, cache_dir: Optional[str] = None,
                 records_file: Optional[str] = None, step: Optional[int] = None, progress: bool = False) -> dict:
    """FID of ``num_samples`` generated images against ``reference`` (default ``cfg.fid_reference``).

    ``cfg`` is the EvalConfig section (or a dict) giving sampler, steps, cfg_scale, cfg_interval_low/high,
    cfg_channels, ddim_eta, batch_size, precision, seed, feature_extractor, inception_weights.
    ``vae`` decodes model-space latents (see :func:`usp_scale.sample.make_decoder`; None = pixel-space
    model). Returns {fid, num_samples, sampler, steps, cfg_scale, sampling_precision, reference,
    feature_extractor, seconds} on every rank. The model is put in eval mode and restored after.
    With ``records_file`` rank 0 also appends the FID record (with ``step``) there (JSON lines + .txt).

    Distributed: collective; a rank may have no samples (``num_samples`` < world size). A failure on any
    rank (setup, sampling, reference or record writing on rank 0) raises :class:`DistributedEvalError` on
    every rank instead of leaving the others waiting in a collective (:func:`agree_on_success`)."""
    t0 = time.perf_counter()
    reference = reference or _get(cfg, "fid_reference", "")
    if not reference:
        raise ValueError("in-training FID needs a reference: set eval.fid_reference to a folder, an image .npz "
                         "or a statistics .npz (mu, sigma)")
    rank, world = get_rank(), get_world_size()
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    sampler_kind = _get(cfg, "sampler", "ddpm")
    steps = int(_get(cfg, "steps", 250))
    cfg_scale = float(_get(cfg, "cfg_scale", 1.0))
    lo, hi = _get(cfg, "cfg_interval_low", 1.0), _get(cfg, "cfg_interval_high", 0.0)
    interval = (float(lo), float(hi)) if lo <= hi else None
    precision = _get(cfg, "precision", "fp32")
    batch_size = int(_get(cfg, "batch_size", 64))
    extractor_name = _get(cfg, "feature_extractor", "inception-v3-compat")
    what = f"FID ({num_samples} samples{f', step {step}' if step is not None else ''})"

    err = None
    try:  # set-up (may fail on one rank only, e.g. out of memory)
        latent_shape = tuple(latent_shape or infer_latent_shape(model))
        num_classes = int(num_classes if num_classes is not None else infer_num_classes(model))
        sampler = build_sampler(sampler_kind, diffusion_or_transport, steps, eta=float(_get(cfg, "ddim_eta", 0.0)))
        model_fn = make_model_fn(model, num_classes=num_classes, cfg_scale=cfg_scale,
                                 cfg_channels=int(_get(cfg, "cfg_channels", 0)), interval=interval,
                                 precision=precision)
        decode = make_decoder(vae, latent_scale) if vae is not None else make_decoder(None)
        layer = default_layer(extractor_name, "fid")
        extractor = create_extractor(extractor_name, [layer], device, _get(cfg, "inception_weights", None))
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
            from tqdm.auto import tqdm
            bar = tqdm(total=len(indices), unit="img", desc="fid samples", leave=False)
        for _, images, _ in generate_batches(model_fn, sampler, decode, indices,
                                             seed=int(_get(cfg, "seed", 0)), latent_shape=latent_shape,
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
           "reference": str(reference), "feature_extractor": extractor_name}
    if step is not None:
        out["step"] = int(step)
    fid = torch.zeros(1, dtype=torch.float64, device=device)
    if rank == 0:
        try:
            N = count.item()
            mu = (s1 / N).cpu().numpy()
            sigma = ((s2 - N * torch.outer(s1 / N, s1 / N)) / (N - 1)).cpu().numpy()
            if isinstance(reference, str) and is_stats_file(reference):
                with np.load(reference) as dref:
                    ref_stats = {"mu": dref["mu"], "sigma": dref["sigma"]}
            else:
                ref = reference_features(reference, extractor, extractor_name, batch_size, device, cache_dir,
                                         progress=progress)
                ref_stats = statistics(ref[layer])
            fid[0] = frechet_distance({"mu": mu, "sigma": sigma}, ref_stats)
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
    from ..sample import make_grid, write_png
    if device is None:
        device = next(model.parameters()).device
    latent_shape = tuple(latent_shape or infer_latent_shape(model))
    num_classes = int(num_classes if num_classes is not None else infer_num_classes(model))
    lo, hi = _get(cfg, "cfg_interval_low", 1.0), _get(cfg, "cfg_interval_high", 0.0)
    sampler = build_sampler(_get(cfg, "sampler", "ddpm"), diffusion_or_transport, int(_get(cfg, "steps", 250)),
                            eta=float(_get(cfg, "ddim_eta", 0.0)))
    model_fn = make_model_fn(model, num_classes=num_classes, cfg_scale=float(_get(cfg, "cfg_scale", 1.0)),
                             cfg_channels=int(_get(cfg, "cfg_channels", 0)),
                             interval=(float(lo), float(hi)) if lo <= hi else None,
                             precision=_get(cfg, "precision", "fp32"))
    decode = make_decoder(vae, latent_scale) if vae is not None else make_decoder(None)
    was_training = model.training
    model.eval()
    try:
        ims = [b for _, b, _ in generate_batches(model_fn, sampler, decode, list(range(num)),
                                                 seed=int(_get(cfg, "seed", 0)), latent_shape=latent_shape,
                                                 num_classes=num_classes, batch_size=int(_get(cfg, "batch_size", 64)),
                                                 device=device)]
    finally:
        model.train(was_training)
    images = np.concatenate(ims)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_png(path, make_grid(images, nrow=int(np.ceil(np.sqrt(len(images))))))
    return path
