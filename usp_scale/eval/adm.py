"""The metric definitions of the ADM evaluator (openai/guided-diffusion ``evaluations/evaluator.py``), on features.

The numbers papers in this line report (DiT, SiT, REPA, LightningDiT, USP) come from that evaluator; these
functions compute the same quantities from the same features (pool_3, mixed_6/conv[..., :7], pool_3 x
``softmax/weights``):

* **FID / sFID** -- ``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)`` with ``mu`` = mean and ``S`` = ``np.cov``
  (N - 1) of the features, float64 (:func:`frechet_distance`, method below).
* **Inception Score** -- softmax of the logits, the samples split **in order** into chunks of 5,000 (the last one
  shorter when N is not a multiple), ``exp(mean_i KL(p_i || mean p))`` per chunk, the mean over chunks; no
  shuffle, no std (:func:`inception_score`).
* **Precision / recall** (Kynkaanniemi et al. 2019) -- k = 3; *squared* Euclidean distances computed in fp16
  (features rounded to fp16; squares, sums and the matrix product accumulated in fp32 and rounded to fp16 after
  each operation, as TF's half kernels with fp32 accumulation do), a block of 10,000 x 10,000 recomputed in fp32
  when any of its fp16 distances is not finite; a point's radius is its 4th-smallest distance within its own set
  (itself included, so its 3rd neighbour); precision = share of samples within some reference point's radius,
  recall = share of reference points within some sample's radius (:func:`precision_recall`).

The Fréchet distance's square-root trace. ADM calls ``scipy.linalg.sqrtm(S1 @ S2)`` and, when the result is not
finite, retries with 1e-6 added to both diagonals; SciPy releases have had regressions there (complex results,
wrong values for ill-conditioned input). Here ``tr sqrt(S1 S2)`` is computed in the symmetric form
``sum_i sqrt(lambda_i(R S2 R))`` with ``R = S1^(1/2)`` from ``numpy.linalg.eigh`` (eigenvalues within rounding of
zero set to zero): the same number (``S1 S2`` is similar to ``R S2 R``), always real and defined for singular
covariances too, so no retry is needed. Inputs that are not covariance matrices (not finite, not symmetric,
eigenvalues below zero beyond rounding) are refused with :class:`MetricInputError`; the tests cross-check the
value with ``scipy.linalg.sqrtm`` and with closed forms for ill-conditioned covariances. A result below zero by
rounding only (identical sets give about -1e-8) is reported as 0.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from ..runtime import full_fp32

SPLIT_SIZE = 5000          # IS chunk size
PR_K = 3                   # neighbourhood size of the manifolds
PR_BLOCK = 10000           # rows and columns of one distance block (its fp16/fp32 choice is per block)


class MetricInputError(ValueError):
    """Input the metrics refuse (names what and where); nothing is reported from it."""


# --------------------------------------------------------------------------- Fréchet distance
def _check_cov(sigma: np.ndarray, what: str) -> np.ndarray:
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise MetricInputError(f"{what}: sigma has shape {sigma.shape}, not a square matrix")
    if not np.isfinite(sigma).all():
        bad = int((~np.isfinite(sigma)).sum())
        raise MetricInputError(f"{what}: sigma holds {bad} non-finite values (NaN/inf); recompute the statistics")
    scale = float(np.abs(sigma).max()) or 1.0
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > 1e-6 * scale:
        raise MetricInputError(f"{what}: sigma is not symmetric (max |S - S^T| = {asym:.3g}); not a covariance")
    return (sigma + sigma.T) / 2


def _psd_sqrt(sigma: np.ndarray, what: str) -> np.ndarray:
    """Symmetric square root of a covariance; eigenvalues below zero beyond rounding are refused."""
    w, v = np.linalg.eigh(sigma)
    tol = max(float(w.max()), 0.0) * sigma.shape[0] * np.finfo(np.float64).eps * 100
    if w.min() < -max(tol, 1e-12):
        raise MetricInputError(f"{what}: sigma has eigenvalue {w.min():.4g} < 0 (largest {w.max():.4g}); not a "
                               "covariance matrix")
    w = np.clip(w, 0.0, None)
    return (v * np.sqrt(w)) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, what=("first", "second")) -> float:
    """``tr sqrt(sigma1 @ sigma2)`` in float64 by the symmetric form (module docstring)."""
    r = _psd_sqrt(sigma1, what[0])
    m = r @ sigma2 @ r
    m = (m + m.T) / 2
    lam = np.linalg.eigvalsh(m)
    tol = max(float(lam.max()), 0.0) * m.shape[0] * np.finfo(np.float64).eps * 100
    if lam.min() < -max(tol, 1e-12):
        _psd_sqrt(sigma2, what[1])                    # names the culprit when it is sigma2
        raise MetricInputError(f"{what[0]} / {what[1]}: the covariance product has eigenvalue {lam.min():.4g} < 0")
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def trace_sqrt_low_rank(features1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr sqrt(S1 @ sigma2)`` for ``S1`` = the covariance of ``features1`` (n x D, n <= D): the nonzero eigenvalues
    of ``S1 sigma2 = X^T X sigma2 / (n - 1)`` are those of the n x n symmetric ``X sigma2 X^T / (n - 1)`` (X the
    centred features), so a 2,023-d sFID of a few hundred samples costs an n x n eigenproblem."""
    x = np.asarray(features1, np.float64)
    x = x - x.mean(0)
    m = (x @ sigma2 @ x.T) / (len(x) - 1)
    m = (m + m.T) / 2
    lam = np.linalg.eigvalsh(m)
    tol = max(float(lam.max()), 0.0) * m.shape[0] * np.finfo(np.float64).eps * 100
    if lam.min() < -max(tol, 1e-12):
        raise MetricInputError(f"the covariance product has eigenvalue {lam.min():.4g} < 0: the reference sigma is "
                               "not a covariance matrix")
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, what=("samples", "reference"), features1=None) -> float:
    """The Fréchet distance of two Gaussians (float64; see the module docstring for the method). ``what`` names
    the two sides in errors (e.g. the files the statistics came from). ``features1``: the (n, D) features whose
    statistics ``mu1``, ``sigma1`` are; with n <= D the trace comes from :func:`trace_sqrt_low_rank` (the same
    number, at the cost of an n x n problem)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    for mu, s, name in ((mu1, s1, what[0]), (mu2, s2, what[1])):
        if mu.ndim != 1 or s.shape != (len(mu), len(mu)):
            raise MetricInputError(f"{name}: mu {mu.shape} and sigma {s.shape} do not fit together")
        if not np.isfinite(mu).all():
            raise MetricInputError(f"{name}: mu holds {int((~np.isfinite(mu)).sum())} non-finite values (NaN/inf)")
    if mu1.shape != mu2.shape:
        raise MetricInputError(f"feature sizes differ: {what[0]} has {mu1.shape[0]}-d statistics, {what[1]} "
                               f"{mu2.shape[0]}-d (statistics from another network or layer?)")
    s1, s2 = _check_cov(s1, what[0]), _check_cov(s2, what[1])
    diff = mu1 - mu2
    if features1 is not None and 1 < len(features1) <= len(mu1):
        tr = trace_sqrt_low_rank(features1, s2)
    else:
        tr = trace_sqrt_product(s1, s2, what)
    fid = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr)
    if fid < 0:
        if fid < -1e-6 * max(1.0, float(np.trace(s1) + np.trace(s2))):
            raise MetricInputError(f"Fréchet distance {fid:.4g} < 0 beyond rounding ({what[0]} vs {what[1]})")
        fid = 0.0
    return fid


# --------------------------------------------------------------------------- Inception Score
def inception_score(logits: torch.Tensor, split_size: int = SPLIT_SIZE) -> float:
    """ADM's IS of ``logits`` (N, classes) = pool_3 x softmax/weights (no bias): ordered chunks of ``split_size``,
    the mean of the per-chunk scores. N < split_size is refused (ADM would score one short chunk)."""
    n = int(logits.shape[0])
    if split_size < 1:
        raise MetricInputError(f"IS split size must be >= 1, got {split_size}")
    if n < split_size:
        raise MetricInputError(f"Inception Score: {n} samples, fewer than one split of {split_size} (ADM's IS "
                               f"splits the samples in order into chunks of {SPLIT_SIZE}); use more samples or a "
                               "smaller --is-split-size (then not comparable with papers)")
    x = logits.double()
    if not torch.isfinite(x).all():
        raise MetricInputError("Inception Score: the logits hold non-finite values")
    logp = torch.log_softmax(x, dim=1)
    p = logp.exp()
    scores = []
    for i in range(0, n, split_size):
        part, lpart = p[i:i + split_size], logp[i:i + split_size]
        logq = part.mean(0, keepdim=True).log()
        kl = torch.where(part > 0, part * (lpart - logq), torch.zeros_like(part)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


# --------------------------------------------------------------------------- precision / recall
def _h(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to fp16 precision (kept in float32)."""
    return x.half().float()


def distance_block(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's ``DistanceBlock``: squared distances (len(u), len(v)) in fp16 with fp32 accumulation, or in fp32 when
    any fp16 value is not finite; returned as float32. ``u``, ``v``: float32 features on one device."""
    with full_fp32():
        u16, v16 = _h(u), _h(v)
        nu = _h(_h(u16 * u16).sum(1))[:, None]
        nv = _h(_h(v16 * v16).sum(1))[None, :]
        d = _h(u16 @ v16.T)                        # matmul: fp32 accumulation, fp16 result
        d = _h(d.mul_(2.0))                        # 2 * matmul in fp16 (overflows to inf like TF's)
        d = _h(torch.sub(nu, d, out=d))            # norm_u - 2 u.v
        d = _h(d.add_(nv)).clamp_(min=0.0)         # + norm_v, then max(., 0)
        if torch.isfinite(d).all():
            return d
        nu32 = (u * u).sum(1)[:, None]
        nv32 = (v * v).sum(1)[None, :]
        d = u @ v.T
        d.mul_(-2.0).add_(nu32).add_(nv32)
        return d.clamp_(min=0.0)


def manifold_radii(features: torch.Tensor, k: int = PR_K, block: int = PR_BLOCK, bar=None) -> torch.Tensor:
    """Squared distance of every point to its k-th neighbour within its own set (the point itself is the 0th)."""
    n = len(features)
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for b1 in range(0, n, block):
        rows = features[b1:b1 + block]
        dist = torch.cat([distance_block(rows, features[b2:b2 + block]) for b2 in range(0, n, block)], 1)
        radii[b1:b1 + block] = torch.kthvalue(dist, k + 1, dim=1).values
        if bar is not None:
            bar.update(len(rows))
    return radii


def precision_recall(features_sample: torch.Tensor, features_ref: torch.Tensor, k: int = PR_K,
                     block: int = PR_BLOCK, device=None, progress: bool = False,
                     what=("samples", "reference")) -> Dict[str, float]:
    """ADM's improved precision and recall (module docstring). ``device``: where the distances are computed
    (default: where the features are; a GPU is much faster for 50,000 samples)."""
    for f, name in ((features_sample, what[0]), (features_ref, what[1])):
        if f.ndim != 2:
            raise MetricInputError(f"precision/recall: {name} features have shape {tuple(f.shape)}, not (N, D)")
        if len(f) <= k:
            raise MetricInputError(f"precision/recall: {name} has {len(f)} points; the k-NN manifold with k={k} "
                                   f"needs at least {k + 1}")
        if not torch.isfinite(f).all():
            raise MetricInputError(f"precision/recall: {name} features hold non-finite values")
    if features_sample.shape[1] != features_ref.shape[1]:
        raise MetricInputError(f"feature sizes differ: {what[0]} {features_sample.shape[1]}-d, {what[1]} "
                               f"{features_ref.shape[1]}-d")
    dev = torch.device(device) if device is not None else features_sample.device
    s = features_sample.to(dev, torch.float32)
    r = features_ref.to(dev, torch.float32)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=2 * len(r) + len(s) + len(r), unit="row", desc="precision/recall", leave=False)
    radii_r = manifold_radii(r, k, block, bar)
    radii_s = manifold_radii(s, k, block, bar)
    ref_in = torch.zeros(len(r), dtype=torch.bool, device=dev)       # recall: reference within the samples
    sample_in = torch.zeros(len(s), dtype=torch.bool, device=dev)    # precision: samples within the reference
    for b1 in range(0, len(r), block):
        rows = r[b1:b1 + block]
        for b2 in range(0, len(s), block):
            d = distance_block(rows, s[b2:b2 + block])
            ref_in[b1:b1 + block] |= (d <= radii_s[None, b2:b2 + block]).any(1)
            sample_in[b2:b2 + block] |= (d <= radii_r[b1:b1 + block, None]).any(0)
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    return {"precision": float(sample_in.double().mean()), "recall": float(ref_in.double().mean())}


def statistics(features: torch.Tensor) -> Dict[str, np.ndarray]:
    """mu (D,) and sigma (D, D) as ``np.mean`` / ``np.cov`` (N - 1) of the features, in float64."""
    x = features.double()
    n = len(x)
    if n < 2:
        raise MetricInputError(f"statistics need at least 2 samples, got {n}")
    mu = x.mean(0)
    xc = x - mu
    sigma = (xc.T @ xc) / (n - 1)
    return {"mu": mu.cpu().numpy(), "sigma": sigma.cpu().numpy()}


def singular_warning(n: int, d: int, metric: str) -> Optional[str]:
    """The warning for statistics of fewer samples than dimensions (a singular covariance)."""
    if n > d:
        return None
    return (f"{metric} from {n} images in {d} dimensions: the covariance is singular (rank <= {n - 1}); the value "
            "is exact for these statistics but biased upwards and not comparable with values from more images "
            "(papers: 50,000 samples); ADM's sqrtm warns here and may retry with 1e-6 added to the diagonals")
