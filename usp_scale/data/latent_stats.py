"""Channel statistics of a latent cache (``latent_stats.json``), for VA-VAE's ``(z - mean) / std`` normalisation
(:mod:`usp_scale.vae.latent_norm` reads them; docs/data.md, "Channel statistics").

As LightningDiT's ``latents_stats.pt``: per-channel mean and std over ``min(num_samples, records)`` stored latents
drawn at random without replacement (10,000 in the reference), the std with Bessel's correction as ``torch.std``.
A record here is one (image, view, flip) slot of the cache; the draw is seeded (``seed``), and recorded with the
count. Everything is accumulated in fp64.

What the statistics describe: the latent LightningDiT trains on is a *posterior sample* (its extraction stores one
``posterior.sample()`` per image); the cache stores the moments instead. The sample's moments follow exactly from
them, without drawing noise: per channel, E[z] = E[mean] and Var[z] = Var[mean] + E[exp(logvar)] (logvar clamped to
[-30, 20] as the loader does). ``mean``/``std`` are those of the sample; ``std_of_means`` (the posterior means'
spread) is recorded beside them for information. One normalisation serves pretraining (on the means), finetuning
(on samples) and decoding.
"""
from __future__ import annotations

import os
import numpy as np
import torch

from ..checkpoint.safe_load import read_json, write_checked_json
from ..vae.latent_norm import STATS_FILE, STATS_FORMAT, STATS_KEY, STATS_VERSION
from .cache_reader import LatentCache

DEFAULT_SAMPLES = 10000


def pick_records(total: int, num_samples: int, seed: int) -> np.ndarray:
    """Flat record numbers (sorted) of the statistics: all of them when ``num_samples`` is 0 or >= ``total``, else
    ``num_samples`` drawn without replacement by a torch generator seeded with ``seed``."""
    if num_samples <= 0 or num_samples >= total:
        return np.arange(total, dtype=np.int64)
    g = torch.Generator().manual_seed(int(seed))
    return np.sort(torch.randperm(total, generator=g)[:num_samples].numpy())


@torch.no_grad()
def compute_latent_stats(cache: LatentCache, num_samples: int = DEFAULT_SAMPLES, seed: int = 0,
                         batch: int = 1024, progress: bool = False) -> dict:
    """Per-channel fp64 statistics of ``cache`` (see the module doc): ``{"mean", "std", "std_of_means"}`` lists of C
    floats plus ``samples``, ``seed``, ``records_total``. Every record read is CRC-checked by the cache reader."""
    slots = 2 * cache.views
    total = len(cache) * slots
    if total == 0:
        raise ValueError(f"latent cache {cache.path} holds no latents: no statistics")
    recs = pick_records(total, num_samples, seed)
    c = cache.latent_shape[0]
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    sv = torch.zeros(c, dtype=torch.float64)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(recs), unit="latent", desc="latent statistics", dynamic_ncols=True, mininterval=1.0)
    for a in range(0, len(recs), batch):
        r = recs[a:a + batch]
        mean, logvar, _, _ = cache.gather(r // slots, (r % slots) // 2, r % 2)
        m = mean.double()                                              # (n, C, h, w)
        s1 += m.sum((0, 2, 3))
        s2 += (m * m).sum((0, 2, 3))
        sv += logvar.double().clamp(-30.0, 20.0).exp().sum((0, 2, 3))
        if bar is not None:
            bar.update(len(r))
    if bar is not None:
        bar.close()
    n = float(len(recs) * cache.latent_shape[1] * cache.latent_shape[2])  # values per channel
    mu = s1 / n
    var_means = (s2 - n * mu * mu).clamp_min(0.0) / max(n - 1.0, 1.0)    # Bessel, as torch.std
    var = var_means + sv / n
    return {"mean": mu.tolist(), "std": var.sqrt().tolist(), "std_of_means": var_means.sqrt().tolist(),
            "samples": int(len(recs)), "seed": int(seed), "records_total": int(total)}


def write_latent_stats(cache_dir: str, num_samples: int = DEFAULT_SAMPLES, seed: int = 0, verify: str = "records",
                       progress: bool = False) -> dict:
    """Compute the statistics of the finished cache at ``cache_dir`` and write ``latent_stats.json`` beside its
    manifest (atomically, with a sha256 of its own content); returns what was written. The file records the
    manifest's hash and the VAE identity, so it cannot be used with another cache's VAE unnoticed."""
    cache = LatentCache(cache_dir, verify=verify)
    stats = compute_latent_stats(cache, num_samples, seed, progress=progress)
    m = cache.manifest
    man_sha = read_json(os.path.join(cache_dir, "manifest.json"), what="latent cache manifest").get("manifest_sha256")
    body = {"format": STATS_FORMAT, "version": STATS_VERSION, "channels": int(cache.latent_shape[0]),
            "what": "posterior sample: mean = E[mean], var = Var[mean] + E[exp(logvar)], per channel, fp64",
            **stats, "latent_shape": list(cache.latent_shape), "cache_manifest_sha256": man_sha,
            "vae": m["vae"]}
    return write_checked_json(os.path.join(cache_dir, STATS_FILE), body, key=STATS_KEY)

