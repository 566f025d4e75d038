"""FID, sFID, Inception Score, KID and precision/recall on features from a torch-fidelity extractor.

Image sources (generated or reference): a folder of PNG/JPEG files (sorted by name), an ADM
``.npz`` (``arr_0`` uint8 [N, H, W, 3]), a uint8 array/tensor [N, H, W, 3], or an iterable of
such batches (e.g. :func:`usp_scale.sample.generate_batches`, whose (indices, images, labels)
tuples are accepted). A reference may also be a statistics ``.npz`` with ``mu`` and ``sigma``
(e.g. ADM's VIRTUAL_imagenet256_labeled.npz, Inception pool features): then FID comes from the
statistics, sFID from its ``mu_s`` / ``sigma_s`` (ADM's spatial statistics) when present, and other
metrics use its ``arr_0`` images when present.

sFID (Nash et al. 2021, as the ADM evaluator computes it) is the Fréchet distance on spatial features:
the first 7 channels of Inception's mixed_6/conv (17x17), 2,023 values per image.

Reference features and statistics are cached in ``cache_dir`` (default
``$USP_SCALE_CACHE`` or ``~/.cache/usp_scale/eval``), keyed by path, size, mtime and extractor.
The metric formulas are torch-fidelity's (FID via eigenvalues of sigma1 sigma2, IS with 10 splits,
polynomial-kernel KID, k-NN manifold precision/recall with k = 3).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from ..fileio import write_with
from .features import INCEPTION_NAME, create_extractor, default_layer

METRICS = ("fid", "sfid", "is", "kid", "pr")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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


def is_stats_file(path) -> bool:
    if not (isinstance(path, str) and path.endswith(".npz") and os.path.isfile(path)):
        return False
    with np.load(path) as d:
        return "mu" in d.files and "sigma" in d.files


def iter_image_batches(source, batch_size: int = 64) -> Iterable[np.ndarray]:
    """uint8 [n, H, W, 3] numpy batches from any supported source."""
    if isinstance(source, str):
        if os.path.isdir(source):
            from PIL import Image
            files = _folder_files(source)
            for i in range(0, len(files), batch_size):
                ims = []
                for f in files[i:i + batch_size]:
                    with Image.open(f) as im:
                        ims.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
                yield np.stack(ims)
            return
        if source.endswith(".npz"):
            if not os.path.isfile(source):
                raise FileNotFoundError(source)
            data = np.load(source, mmap_mode="r")
            if "arr_0" not in data.files:
                raise KeyError(f"{source} has no 'arr_0' images (keys: {data.files})")
            arr = data["arr_0"]
            for i in range(0, len(arr), batch_size):
                yield np.ascontiguousarray(arr[i:i + batch_size])
            return
        raise ValueError(f"image source {source!r}: expected a folder or an .npz file")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        arr = source
        for i in range(0, len(arr), batch_size):
            b = arr[i:i + batch_size]
            yield b.cpu().numpy() if isinstance(b, torch.Tensor) else b
        return
    for item in source:  # iterable / generator of batches
        if isinstance(item, tuple):  # (indices, images, labels) from generate_batches
            item = item[1]
        yield item.cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)


def _npz_len(path: str) -> Optional[int]:
    """Rows of arr_0 from the .npy header inside the .npz, without loading the array."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        if "arr_0.npy" not in z.namelist():
            return None
        with z.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape = read(f)[0]
    return int(shape[0])


def source_count(source) -> Optional[int]:
    if isinstance(source, str):
        if os.path.isdir(source):
            return len(_folder_files(source))
        if source.endswith(".npz"):
            return _npz_len(source)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return len(source)
    return None


@torch.no_grad()
def extract_features(source, extractor, batch_size: int = 64, device="cpu", progress: bool = True,
                     desc: str = "features") -> Dict[str, torch.Tensor]:
    """Run ``extractor`` over all images of ``source``: {layer: float32 (N, D) CPU tensor}."""
    device = torch.device(device)
    total = source_count(source)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="img", desc=desc, leave=False)
    out: Dict[str, list] = {}
    for batch in iter_image_batches(source, batch_size):
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {batch.dtype} {batch.shape}")
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)
        feats = extractor.convert_features_tuple_to_dict(extractor(x))
        for k, v in feats.items():
            out.setdefault(k, []).append(v.float().cpu())
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    if not out:
        raise ValueError("the image source is empty")
    return {k: torch.cat(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- statistics
def frechet_distance(stats1: dict, stats2: dict) -> float:
    """torch-fidelity's FID between two {mu, sigma} (float64)."""
    s1 = {"mu": np.asarray(stats1["mu"], np.float64), "sigma": np.asarray(stats1["sigma"], np.float64)}
    s2 = {"mu": np.asarray(stats2["mu"], np.float64), "sigma": np.asarray(stats2["sigma"], np.float64)}
    if s1["mu"].shape != s2["mu"].shape:
        raise ValueError(f"feature sizes differ: {s1['mu'].shape} vs {s2['mu'].shape} (reference statistics "
                         "from another feature extractor?)")
    return float(fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"])


def statistics(features: torch.Tensor) -> dict:
    """mu (D,), sigma (D, D) in float64 (sigma with the unbiased N-1 divisor)."""
    s = fid_features_to_statistics(features.double())
    return {"mu": s["mu"], "sigma": s["sigma"]}


def inception_score(logits: torch.Tensor, splits: int = 10) -> dict:
    """IS mean/std over ``splits`` from unnormalised logits (N, classes)."""
    r = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=2020)
    return {"is_mean": r["inception_score_mean"], "is_std": r["inception_score_std"]}


def kid(features_gen: torch.Tensor, features_ref: torch.Tensor, subset_size: int = 1000,
        subsets: int = 100) -> dict:
    size = min(subset_size, len(features_gen), len(features_ref))
    r = kid_features_to_metric(features_gen, features_ref, kid_subset_size=size, kid_subsets=subsets, verbose=False)
    return {"kid_mean": r["kernel_inception_distance_mean"], "kid_std": r["kernel_inception_distance_std"],
            "kid_subset_size": size}


def precision_recall(features_gen: torch.Tensor, features_ref: torch.Tensor, k: int = 3,
                     device=None) -> dict:
    """k-NN manifold precision (generated inside the reference manifold) and recall (Kynkaanniemi et al.).

    Distances are computed on ``device`` (default: where the features are); above 10,000 samples the
    blockwise variant is used so the full distance matrices are never held in memory."""
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
        with np.load(cpath) as d:
            return {k: torch.from_numpy(d[k]) for k in layers}
    feats = extract_features(path, extractor, batch_size, device, progress, desc="reference features")
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


# ----------------------------------------------------------------------------- main entry
def compute_metrics(generated, reference=None, metrics: Sequence[str] = ("fid",),
                    feature_extractor: str = INCEPTION_NAME, inception_weights: Optional[str] = None,
                    device="cpu", batch_size: int = 64, cache_dir: Optional[str] = None,
                    kid_subset_size: int = 1000, pr_k: int = 3, is_splits: int = 10,
                    progress: bool = True) -> dict:
    """Metrics of ``generated`` against ``reference``; returns {name: value, ..., num_samples, num_reference}."""
    metrics = [m.lower() for m in metrics]
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metrics {bad}; choose from {METRICS}")
    needs_ref = [m for m in metrics if m != "is"]
    if needs_ref and reference is None:
        raise ValueError(f"metrics {needs_ref} need a reference (folder, image .npz or statistics .npz)")
    layers = {m: default_layer(feature_extractor, m) for m in metrics}
    extractor = create_extractor(feature_extractor, list(layers.values()), device, inception_weights)
    gen = extract_features(generated, extractor, batch_size, device, progress, desc="generated features")
    out: dict = {"num_samples": int(next(iter(gen.values())).shape[0])}
    if "is" in metrics:
        out.update(inception_score(gen[layers["is"]], splits=is_splits))
    ref_feats, ref_stats = None, None
    ref_spatial_stats = None
    if needs_ref:
        if isinstance(reference, str) and is_stats_file(reference):
            with np.load(reference) as d:
                ref_stats = {"mu": d["mu"], "sigma": d["sigma"]}
                has_images = "arr_0" in d.files
                if "mu_s" in d.files and "sigma_s" in d.files:
                    ref_spatial_stats = {"mu": d["mu_s"], "sigma": d["sigma_s"]}
            need_feats = [m for m in metrics if m in ("kid", "pr") or (m == "sfid" and ref_spatial_stats is None)]
            if need_feats:
                if not has_images:
                    raise ValueError(f"{reference} holds only statistics (mu, sigma): {need_feats} need reference "
                                     "images (a folder or an .npz with arr_0), or for sFID its mu_s / sigma_s")
                ref_feats = reference_features(reference, extractor, feature_extractor, batch_size, device,
                                               cache_dir, progress)
        elif isinstance(reference, str):
            ref_feats = reference_features(reference, extractor, feature_extractor, batch_size, device,
                                           cache_dir, progress)
        else:
            ref_feats = extract_features(reference, extractor, batch_size, device, progress, desc="reference features")
        if ref_feats is not None:
            out["num_reference"] = int(next(iter(ref_feats.values())).shape[0])
    if "fid" in metrics:
        if ref_stats is None:
            ref_stats = statistics(ref_feats[layers["fid"]])
        out["fid"] = frechet_distance(statistics(gen[layers["fid"]]), ref_stats)
    if "sfid" in metrics:
        if ref_spatial_stats is None:
            ref_spatial_stats = statistics(ref_feats[layers["sfid"]])
        out["sfid"] = frechet_distance(statistics(gen[layers["sfid"]]), ref_spatial_stats)
    if "kid" in metrics:
        out.update(kid(gen[layers["kid"]], ref_feats[layers["kid"]], subset_size=kid_subset_size))
    if "pr" in metrics:
        out.update(precision_recall(gen[layers["pr"]], ref_feats[layers["pr"]], k=pr_k, device=device))
    return out


# ----------------------------------------------------------------------------- records
CONTEXT_KEYS = ("sampler", "steps", "cfg_scale", "sampling_precision", "reference", "feature_extractor")
VALUE_KEYS = ("fid", "sfid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall")


def make_records(results: dict, context: dict) -> list:
    """One record per metric value: {metric, value, num_samples, sampler, steps, cfg_scale, sampling_precision,
    reference, feature_extractor, ...}; ``sampling_precision`` is the dtype the samples were made in
    (the precision METRIC is the record with metric='precision')."""
    missing = [k for k in CONTEXT_KEYS if k not in context]
    if missing:
        raise ValueError(f"metric records need the context keys {missing}")
    base = {k: v for k, v in results.items() if k not in VALUE_KEYS}
    base.update(context)
    base["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return [dict(base, metric=k, value=float(results[k])) for k in VALUE_KEYS if k in results]


def format_record(r: dict) -> str:
    keys = ("num_samples",) + CONTEXT_KEYS + (("step",) if "step" in r else ())
    return f"{r['metric']}={r['value']:.6g} " + " ".join(f"{k}={r.get(k)}" for k in keys)


def write_records(path: str, records: list) -> None:
    """Append JSON lines to ``path`` and a readable line per record to ``path`` + '.txt'."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    with open(os.path.splitext(path)[0] + ".txt", "a") as f:
        for r in records:
            f.write(format_record(r) + "\n")
