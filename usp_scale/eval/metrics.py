"""FID, sFID, Inception Score, KID and precision/recall, under one of two named protocols.

Protocols (``protocol=``; each record says which produced it):

* ``"adm"`` -- the ADM evaluator's (openai/guided-diffusion ``evaluations/evaluator.py``), which papers in this
  line report: the Inception graph run by :class:`usp_scale.eval.inception.Inception2015`, FID/sFID with the
  reference batch's own ``mu/sigma`` and ``mu_s/sigma_s`` when present, IS in ordered chunks of 5,000 (mean
  only), precision/recall with fp16 squared distances against the reference's ``arr_0`` images; definitions in
  :mod:`usp_scale.eval.adm`. No KID (ADM has none).
* ``"torch-fidelity"`` -- torch-fidelity's network and formulas: FID via eigenvalues of sigma1 sigma2, IS over
  10 equal splits of a shuffled order (mean and std), KID (cubic kernel, subsets of 1,000), precision/recall with
  fp32 Euclidean distances; sFID is the Fréchet distance on ADM's spatial features.
* ``"auto"`` (default) -- ``adm`` when the extractor is the Inception network and the reference is a statistics
  ``.npz`` in ADM's format (``mu``, ``sigma``, ``mu_s``, ``sigma_s``: VIRTUAL_imagenet256_labeled.npz and the
  other ADM reference batches), ``torch-fidelity`` otherwise.

Either way a Fréchet distance below zero by rounding (identical sets) is reported as 0, and nothing non-finite is
reported or written: bad input is refused with :class:`MetricInputError` naming the file and what is wrong.

Image sources (generated or reference): a folder of PNG/JPEG files (sorted by name), an ADM ``.npz`` (``arr_0``
uint8 [N, H, W, 3], read in batches), a uint8 array/tensor [N, H, W, 3], or an iterable of such batches (e.g.
:func:`usp_scale.sample.generate_batches`, whose (indices, images, labels) tuples are accepted). A reference may
also be a statistics ``.npz`` (``mu``, ``sigma``; ``mu_s``, ``sigma_s`` for sFID; ``arr_0`` images for the other
metrics). Reference features are cached in ``cache_dir`` (default ``$USP_SCALE_CACHE`` or
``~/.cache/usp_scale/eval``), keyed by path, size, mtime, extractor and its weights.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import time
import warnings
import zipfile
import zlib
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch

from ..fileio import write_with
from . import adm as A
from .adm import MetricInputError
from .features import INCEPTION_NAME, PROTOCOLS, create_extractor, default_layer, is_inception

METRICS = ("fid", "sfid", "is", "kid", "pr")
ADM_METRICS = ("is", "fid", "sfid", "pr")       # ADM's order of printing
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
STATS_KEYS = ("mu", "sigma")
SPATIAL_STATS_KEYS = ("mu_s", "sigma_s")


# ----------------------------------------------------------------------------- sources
def _folder_files(path: str) -> list:
    """Images of a folder, sorted. In a folder made by launchers/sample.py (it holds sampling.json) only the
    numbered samples ``{index:06d}.png`` count (not grid.png). Elsewhere the folder is searched
    recursively, so an ImageFolder split (one sub-folder per class) is a valid reference."""
    if os.path.isfile(os.path.join(path, "sampling.json")):
        files = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.lower().endswith(IMAGE_EXTS))
        files = [f for f in files if re.fullmatch(r"\d{6,}\.png", os.path.basename(f))]
    else:
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in folder {path}")
    return files


def _npz_keys(path: str) -> list:
    """Array names of an .npz; MetricInputError naming the file when it is not a readable one."""
    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise MetricInputError(f"{path}: not a readable .npz ({type(e).__name__}: {e}); the file is truncated, "
                               "damaged or of another format") from None


def is_stats_file(path) -> bool:
    """An .npz holding FID statistics (``mu`` and ``sigma``)."""
    if not (isinstance(path, str) and path.endswith(".npz") and os.path.isfile(path)):
        return False
    keys = _npz_keys(path)
    return all(k in keys for k in STATS_KEYS)


def is_adm_reference(path) -> bool:
    """An .npz in the format of ADM's reference batches: ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` (and usually the
    ``arr_0`` images precision/recall use)."""
    if not is_stats_file(path):
        return False
    keys = _npz_keys(path)
    return all(k in keys for k in SPATIAL_STATS_KEYS)


def npz_header(path: str, key: str = "arr_0"):
    """(shape, dtype, fortran_order) of array ``key`` inside an .npz, read from its .npy header only;
    None when absent. MetricInputError naming the file when unreadable."""
    keys = _npz_keys(path)
    if key not in keys:
        return None
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise MetricInputError(f"{path}: cannot read the header of {key!r} ({type(e).__name__}: {e}); the file is "
                               "truncated or damaged") from None
    return tuple(shape), dtype, fortran


def _check_images(shape, dtype, where: str) -> None:
    if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise MetricInputError(f"{where}: images must be uint8 NHWC with 3 channels [N, H, W, 3] (ADM's sample "
                               f"format), got {np.dtype(dtype)} {list(shape)}")
    if shape[0] == 0 or shape[1] < 1 or shape[2] < 1:
        raise MetricInputError(f"{where}: no images (shape {list(shape)})")


def _read_npz_batches(path: str, batch_size: int, key: str = "arr_0") -> Iterable[np.ndarray]:
    """``key`` of an .npz in batches, streamed from the zip member (a 50,000-image file is never held whole)."""
    head = npz_header(path, key)
    if head is None:
        raise MetricInputError(f"{path} has no {key!r} images (arrays: {_npz_keys(path)})")
    shape, dtype, fortran = head
    _check_images(shape, dtype, f"{path} ({key})")
    row = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
            done = 0
            while done < shape[0]:
                n = min(batch_size, shape[0] - done)
                buf = f.read(n * row)
                if len(buf) != n * row:
                    raise EOFError(f"{key} ends after {done + len(buf) // row} of {shape[0]} images")
                yield np.frombuffer(bytearray(buf), dtype=dtype).reshape((n,) + tuple(shape[1:]))
                done += n
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
        raise MetricInputError(f"{path}: reading {key!r} failed ({type(e).__name__}: {e}); the file is truncated "
                               "or damaged. No metric was computed from it.") from None


def iter_image_batches(source, batch_size: int = 64) -> Iterable[np.ndarray]:
    """uint8 [n, H, W, 3] numpy batches from any supported source; MetricInputError names a bad source."""
    if isinstance(source, str):
        if os.path.isdir(source):
            from PIL import Image, UnidentifiedImageError
            files = _folder_files(source)
            for i in range(0, len(files), batch_size):
                ims = []
                for f in files[i:i + batch_size]:
                    try:
                        with Image.open(f) as im:
                            ims.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
                    except (OSError, UnidentifiedImageError) as e:
                        raise MetricInputError(f"{f}: cannot read the image ({e})") from None
                if len({a.shape for a in ims}) > 1:
                    raise MetricInputError(f"{source}: images of different sizes in one batch "
                                           f"({sorted({a.shape for a in ims})[:3]})")
                yield np.stack(ims)
            return
        if source.endswith(".npz"):
            if not os.path.isfile(source):
                raise FileNotFoundError(f"image file not found: {source}")
            yield from _read_npz_batches(source, batch_size)
            return
        raise MetricInputError(f"image source {source!r}: expected a folder or an .npz file")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        _check_images(tuple(source.shape), np.uint8 if source.dtype in (np.uint8, torch.uint8) else np.float32,
                      "image array")
        arr = source
        for i in range(0, len(arr), batch_size):
            b = arr[i:i + batch_size]
            yield b.cpu().numpy() if isinstance(b, torch.Tensor) else b
        return
    for item in source:  # iterable / generator of batches
        if isinstance(item, tuple):  # (indices, images, labels) from generate_batches
            item = item[1]
        yield item.cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)


def source_count(source) -> Optional[int]:
    """Number of images of ``source`` without reading them (None for an iterable)."""
    if isinstance(source, str):
        if os.path.isdir(source):
            return len(_folder_files(source))
        if source.endswith(".npz"):
            if not os.path.isfile(source):
                raise FileNotFoundError(f"image file not found: {source}")
            head = npz_header(source)
            return None if head is None else int(head[0][0])
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return len(source)
    return None


def check_image_source(source, what: str) -> Optional[int]:
    """Refuse a source that is not images before anything is computed; returns its size when known."""
    if isinstance(source, str):
        if not os.path.exists(source):
            raise FileNotFoundError(f"{what} not found: {source}")
        if source.endswith(".npz") and os.path.isfile(source):
            head = npz_header(source)
            if head is None:
                raise MetricInputError(f"{what} {source} has no 'arr_0' images (arrays: {_npz_keys(source)})")
            _check_images(head[0], head[1], f"{what} {source}")
            return int(head[0][0])
        if not os.path.isdir(source):
            raise MetricInputError(f"{what} {source}: expected a folder of images or an .npz with 'arr_0'")
        return len(_folder_files(source))
    if isinstance(source, (np.ndarray, torch.Tensor)):
        dt = np.uint8 if source.dtype in (np.uint8, torch.uint8) else (
            source.dtype if isinstance(source, np.ndarray) else np.float32)
        _check_images(tuple(source.shape), dt, f"{what} array")
        return len(source)
    return None


@torch.no_grad()
def extract_features(source, extractor, batch_size: int = 64, device="cpu", progress: bool = True,
                     desc: str = "features") -> Dict[str, torch.Tensor]:
    """Run ``extractor`` over all images of ``source`` in batches on ``device``: {layer: float32 (N, D) CPU
    tensor}. A progress bar counts images."""
    device = torch.device(device)
    total = source_count(source)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="img", desc=desc, leave=False)
    out: Dict[str, list] = {}
    try:
        for batch in iter_image_batches(source, batch_size):
            if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
                raise MetricInputError(f"{desc}: images must be uint8 [N, H, W, 3], got {batch.dtype} {batch.shape}")
            x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)
            feats = extractor.convert_features_tuple_to_dict(extractor(x))
            for k, v in feats.items():
                out.setdefault(k, []).append(v.float().cpu())
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    if not out:
        raise MetricInputError(f"{desc}: the image source is empty")
    feats = {k: torch.cat(v) for k, v in out.items()}
    for k, v in feats.items():
        if not torch.isfinite(v).all():
            raise MetricInputError(f"{desc}: the feature extractor gave non-finite {k} features")
    return feats


# ----------------------------------------------------------------------------- statistics
def statistics(features: torch.Tensor) -> dict:
    """mu (D,), sigma (D, D) in float64 (sigma with the unbiased N-1 divisor, as ``np.cov``)."""
    return A.statistics(features)


def frechet_distance(stats1: dict, stats2: dict, protocol: str = "torch-fidelity",
                     what=("samples", "reference"), features1: Optional[torch.Tensor] = None) -> float:
    """The Fréchet distance between two {mu, sigma} (float64). ``protocol="adm"``: the symmetric-form trace of
    :mod:`usp_scale.eval.adm`; ``"torch-fidelity"``: torch-fidelity's formula (real parts of the square roots of
    the eigenvalues of sigma1 sigma2). Both refuse non-finite or mismatched statistics (naming ``what``) and
    report a rounding-only negative value as 0."""
    mu1, s1 = np.asarray(stats1["mu"], np.float64), np.asarray(stats1["sigma"], np.float64)
    mu2, s2 = np.asarray(stats2["mu"], np.float64), np.asarray(stats2["sigma"], np.float64)
    if protocol == "adm":
        f1 = None if features1 is None else features1.double().cpu().numpy()
        return A.frechet_distance(mu1, s1, mu2, s2, what, features1=f1)
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    for mu, s, name in ((mu1, s1, what[0]), (mu2, s2, what[1])):
        if mu.ndim != 1 or s.shape != (len(mu), len(mu)):
            raise MetricInputError(f"{name}: mu {mu.shape} and sigma {s.shape} do not fit together")
        if not (np.isfinite(mu).all() and np.isfinite(s).all()):
            raise MetricInputError(f"{name}: the statistics hold non-finite values (NaN/inf)")
    if mu1.shape != mu2.shape:
        raise MetricInputError(f"feature sizes differ: {what[0]} has {mu1.shape[0]}-d statistics, {what[1]} "
                               f"{mu2.shape[0]}-d (statistics from another network or layer?)")
    fid = float(fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2},
                                         verbose=False)["frechet_inception_distance"])
    if not math.isfinite(fid):
        raise MetricInputError(f"the Fréchet distance of {what[0]} and {what[1]} is not finite")
    if fid < 0:
        if fid < -1e-6 * max(1.0, float(np.trace(s1) + np.trace(s2))):
            raise MetricInputError(f"Fréchet distance {fid:.4g} < 0 beyond rounding ({what[0]} vs {what[1]})")
        fid = 0.0
    return fid


def inception_score(logits: torch.Tensor, splits: int = 10) -> dict:
    """torch-fidelity's IS of unnormalised logits (N, classes): mean and std over ``splits`` equal splits of a
    shuffled order (seed 2020). Fewer samples than splits is refused (it would give NaN)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    if splits < 1 or len(logits) < splits:
        raise MetricInputError(f"Inception Score: {len(logits)} samples cannot fill {splits} splits (torch-fidelity "
                               "protocol); use at least as many samples as splits, or fewer splits")
    r = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=2020)
    return {"is_mean": r["inception_score_mean"], "is_std": r["inception_score_std"]}


def kid(features_gen: torch.Tensor, features_ref: torch.Tensor, subset_size: int = 1000,
        subsets: int = 100) -> dict:
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset_size, len(features_gen), len(features_ref))
    if size < 2:
        raise MetricInputError(f"KID needs at least 2 samples on each side, got {len(features_gen)} and "
                               f"{len(features_ref)}")
    r = kid_features_to_metric(features_gen, features_ref, kid_subset_size=size, kid_subsets=subsets, verbose=False)
    return {"kid_mean": r["kernel_inception_distance_mean"], "kid_std": r["kernel_inception_distance_std"],
            "kid_subset_size": size}


def precision_recall(features_gen: torch.Tensor, features_ref: torch.Tensor, k: int = 3,
                     device=None) -> dict:
    """torch-fidelity's k-NN manifold precision (generated inside the reference manifold) and recall
    (Kynkaanniemi et al.), fp32 Euclidean distances. Each set needs more than ``k`` points.

    Distances are computed on ``device`` (default: where the features are); above 10,000 samples the
    blockwise variant is used so the full distance matrices are never held in memory."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    for f, name in ((features_gen, "samples"), (features_ref, "reference")):
        if len(f) <= k:
            raise MetricInputError(f"precision/recall: {name} has {len(f)} points; the k-NN manifold with k={k} "
                                   f"needs at least {k + 1}")
    if device is not None:
        features_gen, features_ref = features_gen.to(device), features_ref.to(device)
    big = max(len(features_gen), len(features_ref)) > 10000
    r = prc_features_to_metric(features_gen, features_ref, prc_neighborhood=k, save_cpu_ram=big, verbose=False)
    return {"precision": r["precision"], "recall": r["recall"]}


def default_cache_dir() -> str:
    return os.environ.get("USP_SCALE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "usp_scale", "eval"))


def _cache_key(path: str, extractor_name: str, layers: Sequence[str]) -> str:
    ap = os.path.abspath(path)
    if os.path.isdir(ap):
        files = _folder_files(ap)
        st = (len(files), max(os.stat(f).st_mtime_ns for f in files), sum(os.stat(f).st_size for f in files))
    else:
        s = os.stat(ap)
        st = (s.st_size, s.st_mtime_ns)
    h = hashlib.sha1(json.dumps([ap, st, extractor_name, sorted(layers)]).encode()).hexdigest()[:16]
    return f"{os.path.basename(ap.rstrip(os.sep))}-{extractor_name}-{h}"


def reference_features(path: str, extractor, extractor_name: str, batch_size: int = 64, device="cpu",
                       cache_dir: Optional[str] = None, progress: bool = True) -> Dict[str, torch.Tensor]:
    """Features of a reference folder / image .npz, cached on disk."""
    layers = list(extractor.get_requested_features_list())
    cache_dir = cache_dir or default_cache_dir()
    tag = getattr(extractor, "cache_tag", "")  # e.g. a hash of trained weights that may change
    cpath = os.path.join(cache_dir, _cache_key(path, extractor_name + (f"@{tag}" if tag else ""), layers) + ".npz")
    if os.path.isfile(cpath):
        try:
            with np.load(cpath) as d:
                return {k: torch.from_numpy(d[k]) for k in layers}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            pass                                     # a damaged cache entry is recomputed
    feats = extract_features(path, extractor, batch_size, device, progress, desc=f"reference features {path}")
    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, **{k: v.numpy() for k, v in feats.items()})
    write_with(cpath, save, needed=sum(v.numel() * v.element_size() for v in feats.values()))
    return feats


def save_statistics(path: str, features: torch.Tensor, spatial: Optional[torch.Tensor] = None) -> str:
    """Write {mu, sigma} (and, given the sFID features, ADM's {mu_s, sigma_s}) as an .npz usable as a
    FID / sFID reference."""
    s = statistics(features)
    extra = {}
    if spatial is not None:
        ss = statistics(spatial)
        extra = {"mu_s": ss["mu"], "sigma_s": ss["sigma"]}
    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, mu=s["mu"], sigma=s["sigma"], **extra)
    return write_with(path, save)


def read_reference_statistics(path: str, keys=STATS_KEYS) -> Optional[dict]:
    """{mu, sigma} from ``keys`` of a reference .npz (None when absent), checked: shapes that fit, finite values;
    MetricInputError names the file and key."""
    present = _npz_keys(path)
    if not all(k in present for k in keys):
        return None
    try:
        with np.load(path) as d:
            mu, sigma = np.asarray(d[keys[0]], np.float64), np.asarray(d[keys[1]], np.float64)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise MetricInputError(f"{path}: cannot read {keys} ({type(e).__name__}: {e}); truncated or damaged") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise MetricInputError(f"{path}: {keys[0]} {mu.shape} and {keys[1]} {sigma.shape} do not fit together")
    for k, a in zip(keys, (mu, sigma)):
        if not np.isfinite(a).all():
            raise MetricInputError(f"{path}: {k} holds {int((~np.isfinite(a)).sum())} non-finite values (NaN/inf); "
                                   "the statistics are unusable, recompute them (launchers/evaluate.py --save-stats)")
    return {"mu": mu, "sigma": sigma}


def _feature_dims(extractor, layers: Sequence[str], device) -> Dict[str, int]:
    """Feature sizes of ``layers`` (one small dummy image)."""
    net = getattr(extractor, "net", None)
    if hasattr(net, "feature_dims"):
        return {k: v for k, v in net.feature_dims().items() if k in layers}
    x = torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device=device)
    with torch.no_grad():
        feats = extractor.convert_features_tuple_to_dict(extractor(x))
    return {k: int(v.shape[1]) for k, v in feats.items()}


def resolve_protocol(protocol: str, feature_extractor: str, reference) -> str:
    """``auto`` -> ``adm`` for the Inception network against an ADM-format reference, else ``torch-fidelity``."""
    if protocol == "auto":
        return "adm" if is_inception(feature_extractor) and is_adm_reference(reference) else "torch-fidelity"
    if protocol not in PROTOCOLS:
        raise MetricInputError(f"protocol {protocol!r}: choose from auto, {', '.join(PROTOCOLS)}")
    return protocol


def fid_extractor(name: str, inception_weights: Optional[str], device, protocol: str = "auto",
                  reference: Optional[str] = None):
    """(extractor, layer) for FID under ``protocol`` (resolved against ``reference``), after checking that the
    reference's statistics, when it is a statistics file, fit the extractor's features (in-training FID builds
    this once at start-up, so a mismatch stops the run there)."""
    protocol = resolve_protocol(protocol, name, reference)
    layer = default_layer(name, "fid")
    ext = create_extractor(name, [layer], device, inception_weights, protocol=protocol)
    if isinstance(reference, str) and is_stats_file(reference):
        st = read_reference_statistics(reference)
        d = _feature_dims(ext, [layer], device)[layer]
        if len(st["mu"]) != d:
            raise MetricInputError(f"reference {reference}: mu/sigma are {len(st['mu'])}-d but feature extractor "
                                   f"{name!r} gives {d}-d features (statistics from another network?)")
    return ext, layer


# ----------------------------------------------------------------------------- main entry
def compute_metrics(generated, reference=None, metrics: Optional[Sequence[str]] = None,
                    feature_extractor: str = INCEPTION_NAME, inception_weights: Optional[str] = None,
                    device="cpu", batch_size: int = 64, cache_dir: Optional[str] = None,
                    kid_subset_size: int = 1000, pr_k: int = 3, is_splits: int = 10,
                    progress: bool = True, protocol: str = "auto", is_split_size: int = A.SPLIT_SIZE) -> dict:
    """Metrics of ``generated`` against ``reference`` under ``protocol`` (module docstring); returns {name:
    value, ..., num_samples, num_reference, protocol, feature_extractor, warnings}. ``metrics`` default: ADM's
    five (is, fid, sfid, pr) under ``adm``, fid under ``torch-fidelity``. ``is_splits``: torch-fidelity's
    number of IS splits; ``is_split_size``: ADM's IS chunk size. Every input is checked before features are
    computed; bad input raises :class:`MetricInputError` (or FileNotFoundError) naming the file."""
    protocol = resolve_protocol(protocol, feature_extractor, reference)
    metrics = list(ADM_METRICS if protocol == "adm" else ("fid",)) if metrics is None else \
        [m.lower() for m in metrics]
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise MetricInputError(f"unknown metrics {bad}; choose from {METRICS}")
    if protocol == "adm" and "kid" in metrics:
        raise MetricInputError("kid is not part of the ADM evaluator; compute it with --protocol torch-fidelity")
    needs_ref = [m for m in metrics if m != "is"]
    if needs_ref and reference is None:
        raise MetricInputError(f"metrics {needs_ref} need a reference (folder, image .npz or statistics .npz)")
    warn: list = []

    # -- every input checked before any feature is computed
    gen_name = generated if isinstance(generated, str) else "samples"
    n_gen = check_image_source(generated, "samples")
    ref_name = reference if isinstance(reference, str) else "reference"
    ref_stats = ref_spatial_stats = None
    ref_is_file = isinstance(reference, str) and os.path.isfile(reference) and reference.endswith(".npz")
    if needs_ref and ref_is_file and is_stats_file(reference):
        ref_stats = read_reference_statistics(reference, STATS_KEYS)
        ref_spatial_stats = read_reference_statistics(reference, SPATIAL_STATS_KEYS)
    need_ref_feats = [m for m in needs_ref if m in ("kid", "pr") or (m == "sfid" and ref_spatial_stats is None)
                      or (m == "fid" and ref_stats is None)]
    n_ref = None
    if need_ref_feats:
        if ref_is_file and npz_header(reference) is None:
            raise MetricInputError(f"reference {reference} holds only statistics ({', '.join(_npz_keys(reference))}), "
                                   "no 'arr_0' images: "
                                   f"{need_ref_feats} need the reference images (ADM's reference batches carry "
                                   "them as arr_0), or for sFID its mu_s / sigma_s")
        n_ref = check_image_source(reference, "reference")
    if "is" in metrics:
        if protocol == "adm" and n_gen is not None and n_gen < is_split_size:
            raise MetricInputError(f"samples {gen_name}: {n_gen} images, fewer than one IS split of {is_split_size} "
                                   "(ADM splits the samples in order into chunks of 5,000); give more samples or "
                                   "a smaller --is-split-size (then not comparable with papers)")
        if protocol != "adm" and n_gen is not None and n_gen < is_splits:
            raise MetricInputError(f"samples {gen_name}: {n_gen} images cannot fill {is_splits} IS splits "
                                   "(torch-fidelity protocol)")
    if "pr" in metrics:
        for n, name in ((n_gen, "samples"), (n_ref, f"reference {ref_name}")):
            if n is not None and n <= pr_k:
                raise MetricInputError(f"precision/recall: {name} has {n} images; the k-NN manifold (k={pr_k}) needs "
                                       f"at least {pr_k + 1}")

    layers = {m: default_layer(feature_extractor, m) for m in metrics}
    extractor = create_extractor(feature_extractor, list(layers.values()), device, inception_weights,
                                 protocol=protocol)
    dims = _feature_dims(extractor, list(layers.values()), device)
    for m, st in (("fid", ref_stats), ("sfid", ref_spatial_stats)):
        if m in metrics and st is not None and len(st["mu"]) != dims[layers[m]]:
            keys = "mu/sigma" if m == "fid" else "mu_s/sigma_s"
            hint = (f" (ADM's Inception statistics: use --feature-extractor {INCEPTION_NAME} with the Inception "
                    "graph or weights)" if len(st["mu"]) in (2048, 2023) and not is_inception(feature_extractor)
                    else " (statistics from another network or layer?)")
            raise MetricInputError(f"reference {reference}: {keys} are {len(st['mu'])}-d but feature extractor "
                                   f"{feature_extractor!r} gives {dims[layers[m]]}-d {layers[m]} features{hint}")

    # -- features
    gen = extract_features(generated, extractor, batch_size, device, progress, desc="sample features")
    out: dict = {"num_samples": int(next(iter(gen.values())).shape[0]), "protocol": protocol,
                 "feature_extractor": feature_extractor}
    ref_feats = None
    if need_ref_feats:
        if isinstance(reference, str):
            ref_feats = reference_features(reference, extractor, extractor.get_name() if protocol == "adm"
                                           else feature_extractor, batch_size, device, cache_dir, progress)
        else:
            ref_feats = extract_features(reference, extractor, batch_size, device, progress, desc="reference features")
        out["num_reference"] = int(next(iter(ref_feats.values())).shape[0])

    # -- metrics (ADM's order)
    what = (gen_name, ref_name)
    n = out["num_samples"]
    if "is" in metrics:
        if protocol == "adm":
            out["is_mean"] = A.inception_score(gen[layers["is"]], is_split_size)
        else:
            out.update(inception_score(gen[layers["is"]], splits=is_splits))
    for m in ("fid", "sfid"):
        if m not in metrics:
            continue
        st = (ref_stats if m == "fid" else ref_spatial_stats) or statistics(ref_feats[layers[m]])
        d = dims[layers[m]]
        w = A.singular_warning(n, d, m.upper() if m == "fid" else "sFID")
        if w:
            warn.append(w)
        if ref_feats is not None and ((m == "fid" and ref_stats is None) or (m == "sfid" and ref_spatial_stats is None)):
            w = A.singular_warning(out["num_reference"], d, f"the reference's {m.upper() if m == 'fid' else 'sFID'}"
                                   " statistics")
            if w:
                warn.append(w)
        out[m] = frechet_distance(statistics(gen[layers[m]]), st, protocol, what, features1=gen[layers[m]])
    if "kid" in metrics:
        out.update(kid(gen[layers["kid"]], ref_feats[layers["kid"]], subset_size=kid_subset_size))
    if "pr" in metrics:
        if protocol == "adm":
            out.update(A.precision_recall(gen[layers["pr"]], ref_feats[layers["pr"]], k=pr_k, device=device,
                                          progress=progress, what=what))
        else:
            out.update(precision_recall(gen[layers["pr"]], ref_feats[layers["pr"]], k=pr_k, device=device))
    for k in VALUE_KEYS:
        if k in out and not math.isfinite(float(out[k])):
            raise MetricInputError(f"{k} of {gen_name} vs {ref_name} is not finite ({out[k]}); nothing reported")
    for w in warn:
        warnings.warn(w, stacklevel=2)
    out["warnings"] = warn
    return out


# ----------------------------------------------------------------------------- records
CONTEXT_KEYS = ("protocol", "sampler", "steps", "cfg_scale", "sampling_precision", "reference", "feature_extractor")
VALUE_KEYS = ("fid", "sfid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall")
# ADM's printout: its label and our result key, in its order
ADM_LABELS = (("Inception Score", "is_mean"), ("FID", "fid"), ("sFID", "sfid"), ("Precision", "precision"),
              ("Recall", "recall"))


def make_records(results: dict, context: dict) -> list:
    """One record per metric value: {metric, value, protocol, num_samples, sampler, steps, cfg_scale,
    sampling_precision, reference, feature_extractor, ...}; ``protocol`` is the one that produced the value,
    ``sampling_precision`` the dtype the samples were made in (the precision METRIC is the record with
    metric='precision'). A non-finite value is refused (JSON has no NaN)."""
    missing = [k for k in CONTEXT_KEYS if k not in context and k not in results]
    if missing:
        raise ValueError(f"metric records need the context keys {missing}")
    base = {k: v for k, v in results.items() if k not in VALUE_KEYS}
    base.update(context)
    base["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    recs = [dict(base, metric=k, value=float(results[k])) for k in VALUE_KEYS if k in results]
    bad = [r["metric"] for r in recs if not math.isfinite(r["value"])]
    if bad:
        raise MetricInputError(f"non-finite metric values {bad}: not recorded")
    return recs


def format_record(r: dict) -> str:
    keys = ("protocol", "num_samples") + CONTEXT_KEYS[1:] + (("step",) if "step" in r else ())
    return f"{r['metric']}={r['value']:.6g} " + " ".join(f"{k}={r.get(k)}" for k in keys)


def format_adm(results: dict) -> str:
    """ADM's printout (``print("FID:", value)``, ...) of the values present, in its order."""
    return "\n".join(f"{label}: {float(results[k])!r}" for label, k in ADM_LABELS if k in results)


def write_records(path: str, records: list) -> None:
    """Append JSON lines to ``path`` and a readable line per record to ``path`` + '.txt'. Values are finite (the
    file stays valid JSON)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lines = [json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in records]
    with open(path, "a") as f:
        f.writelines(lines)
    with open(os.path.splitext(path)[0] + ".txt", "a") as f:
        for r in records:
            f.write(format_record(r) + "\n")
