"""The latent normalisation between a VAE's raw latents and the model's input: one scale factor (SD-VAE's 0.18215)
or, for VA-VAE (``vae.version=f16d32``), LightningDiT's channel-wise ``(z - mean) / std * multiplier`` with
statistics of the latents themselves (docs/data.md, "Channel statistics").

:class:`LatentNorm` is the one place both directions live: the encoders (:class:`~usp_scale.vae.FrozenVAE`, the
latent-cache loader) call :meth:`LatentNorm.apply`, every decoder (sampling, in-training FID) calls
:meth:`LatentNorm.invert` through :meth:`FrozenVAE.decode`, so training and sampling cannot disagree.

Statistics files (``vae.latent_stats``):

* a latent cache folder, or its ``latent_stats.json`` (written by ``launchers/cache_latents.py``: fp64 statistics
  of the cache's latents, the sample count and seed, the cache manifest's hash and the VAE's content fingerprint,
  under a sha256 of its own content: an edited file is refused);
* LightningDiT's ``latents_stats.pt`` (``{"mean": (1, C, 1, 1), "std": (1, C, 1, 1)}``, read without running code).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..checkpoint.safe_load import CheckpointFileError, read_checked_json, read_json, torch_load

STATS_FILE = "latent_stats.json"
STATS_FORMAT = "usp_scale.latent_stats"
STATS_VERSION = 1
STATS_KEY = "stats_sha256"


class LatentStatsError(ValueError):
    """A statistics file that is missing, damaged or does not fit the VAE / cache it is used with."""


class LatentNorm:
    """Raw VAE latents <-> model-space latents.

    ``mean``/``std`` None: ``z * scale`` (and ``/ scale``), bit-identical to the project's scale-factor path.
    With statistics (C,) fp64: ``(z - mean) / std * multiplier`` (and its inverse), computed in fp32 on ``z``'s
    device, as LightningDiT does."""

    def __init__(self, scale: float = 1.0, mean: Optional[torch.Tensor] = None, std: Optional[torch.Tensor] = None,
                 multiplier: float = 1.0, source: str = ""):
        if (mean is None) != (std is None):
            raise ValueError("LatentNorm: give both mean and std, or neither")
        if std is not None and (std.ndim != 1 or mean.shape != std.shape or not bool((std > 0).all())):
            raise LatentStatsError(f"latent statistics {source or ''}: mean/std must be (C,) with std > 0, got "
                                   f"{tuple(mean.shape)} / {tuple(std.shape)}")
        if not multiplier > 0:
            raise ValueError(f"vae.latent_multiplier={multiplier}: must be > 0")
        self.scale, self.multiplier, self.source = float(scale), float(multiplier), source
        self.mean = None if mean is None else mean.detach().to("cpu", torch.float64)
        self.std = None if std is None else std.detach().to("cpu", torch.float64)
        self._dev: dict = {}

    @property
    def channelwise(self) -> bool:
        return self.mean is not None

    @property
    def channels(self) -> Optional[int]:
        return None if self.mean is None else int(self.mean.numel())

    def _stats_on(self, z: torch.Tensor):
        key = z.device
        if key not in self._dev:
            shape = (1, -1, 1, 1)
            self._dev[key] = (self.mean.to(z.device, torch.float32).view(shape),
                              self.std.to(z.device, torch.float32).view(shape))
        return self._dev[key]

    def _check(self, z: torch.Tensor) -> None:
        if z.shape[1] != self.channels:
            raise LatentStatsError(f"latent statistics {self.source}: {self.channels} channels, the latents have "
                                   f"{z.shape[1]}")

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (N, C, h, w) -> model space, fp32 (in place when ``z`` is an fp32 tensor the caller owns)."""
        if not self.channelwise:
            return z.mul_(self.scale)
        self._check(z)
        mean, std = self._stats_on(z)
        return z.sub_(mean).div_(std).mul_(self.multiplier)

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> raw latents (a new fp32 tensor)."""
        if not self.channelwise:
            return z / self.scale
        self._check(z)
        mean, std = self._stats_on(z)
        return z.float() / self.multiplier * std + mean

    def describe(self) -> dict:
        if not self.channelwise:
            return {"kind": "scale", "scale": self.scale}
        return {"kind": "channelwise", "multiplier": self.multiplier, "stats": self.source, "channels": self.channels}


def stats_path(path: str) -> str:
    """A cache folder -> its ``latent_stats.json``; a file path unchanged."""
    return os.path.join(path, STATS_FILE) if os.path.isdir(path) else path


def _check_fresh(p: str, d: dict, what: str) -> None:
    """A ``latent_stats.json`` that sits in a latent cache folder describes that cache's latents: refused when the
    cache's manifest was rewritten after the statistics were computed (its ``manifest_sha256`` differs from the
    ``cache_manifest_sha256`` they recorded), since they may describe other latents."""
    man_path = os.path.join(os.path.dirname(os.path.abspath(p)), "manifest.json")
    recorded = d.get("cache_manifest_sha256")
    if recorded is None or not os.path.isfile(man_path):
        return
    try:
        current = read_json(man_path, what="latent cache manifest").get("manifest_sha256")
    except CheckpointFileError as e:
        raise LatentStatsError(f"{what}: {e}") from e
    if current != recorded:
        raise LatentStatsError(f"{what}={p}: stale statistics: they were computed for the latent cache manifest "
                               f"with sha256 {recorded}, but {man_path} now has {current} (the cache was rewritten "
                               "after them); rerun launchers/cache_latents.py with the cache's arguments (it "
                               "recomputes latent_stats.json for a finished cache)")


def read_latent_stats(path: str, what: str = "vae.latent_stats") -> dict:
    """``{"mean": (C,) fp64, "std": (C,) fp64, "meta": dict}`` from a cache folder, its ``latent_stats.json`` or
    LightningDiT's ``latents_stats.pt``. Errors name the file and ``what`` (the config key)."""
    p = stats_path(path)
    if os.path.isdir(path) and not os.path.isfile(p):
        raise LatentStatsError(f"{what}={path}: the latent cache has no {STATS_FILE} (no channel statistics): rerun "
                               f"launchers/cache_latents.py with the same arguments (it adds them to a finished "
                               f"cache; cache.stats_samples sets how many latents they are estimated from)")
    if not os.path.isfile(p):
        raise LatentStatsError(f"{what}={path}: not found (a latent cache folder, its {STATS_FILE}, or a "
                               f"LightningDiT latents_stats.pt)")
    if p.endswith(".json"):
        try:
            d = read_checked_json(p, what="latent statistics", key=STATS_KEY)
        except CheckpointFileError as e:
            raise LatentStatsError(f"{what}: {e}") from e
        if d.get("format") != STATS_FORMAT or d.get("version") != STATS_VERSION:
            raise LatentStatsError(f"{what}={p} is not a usp_scale latent statistics file (format "
                                   f"{d.get('format')!r}, version {d.get('version')!r})")
        _check_fresh(p, d, what)
        mean = torch.tensor(d["mean"], dtype=torch.float64)
        std = torch.tensor(d["std"], dtype=torch.float64)
        meta = {k: v for k, v in d.items() if k not in ("mean", "std")}
    elif p.endswith((".pt", ".pth")):
        try:
            d = torch_load(p, what="latent statistics (latents_stats.pt)")
        except CheckpointFileError as e:
            raise LatentStatsError(f"{what}: {e}") from e
        if not isinstance(d, dict) or not {"mean", "std"} <= set(d) or not all(torch.is_tensor(d[k])
                                                                                for k in ("mean", "std")):
            raise LatentStatsError(f"{what}={p}: expected LightningDiT's {{'mean': tensor, 'std': tensor}}, got "
                                   f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
        mean, std = d["mean"].double().flatten(), d["std"].double().flatten()
        meta = {"format": "lightningdit.latents_stats", "file": p}
    else:
        raise LatentStatsError(f"{what}={p}: use a latent cache folder, a {STATS_FILE} or a latents_stats.pt")
    if mean.shape != std.shape or mean.ndim != 1 or not bool(torch.isfinite(mean).all() & torch.isfinite(std).all()) \
            or not bool((std > 0).all()):
        raise LatentStatsError(f"{what}={p}: mean {tuple(mean.shape)} and std {tuple(std.shape)} must be finite "
                               "per-channel vectors with std > 0")
    return {"mean": mean, "std": std, "meta": meta, "file": p}


def build_latent_norm(scale: float, latent_stats: str = "", multiplier: float = 1.0, *,
                      channels: Optional[int] = None, vae_content: Optional[str] = None,
                      what: str = "vae.latent_stats") -> LatentNorm:
    """The job's :class:`LatentNorm`: ``scale`` alone, or the statistics at ``latent_stats``, checked against the
    latent ``channels`` and, when the file records it, the VAE's content fingerprint ``vae_content``."""
    if not latent_stats:
        return LatentNorm(scale=scale)
    s = read_latent_stats(latent_stats, what)
    if channels is not None and s["mean"].numel() != channels:
        raise LatentStatsError(f"{what}={s['file']}: statistics of {s['mean'].numel()} channels, the VAE's latents "
                               f"have {channels}")
    recorded = (s["meta"].get("vae") or {}).get("content")
    if vae_content is not None and recorded is not None and recorded != vae_content:
        raise LatentStatsError(f"{what}={s['file']}: the statistics are of the latents of a VAE with content "
                               f"fingerprint {recorded}, this job's VAE (vae.path) has {vae_content}: use the "
                               "statistics of this VAE's cache")
    return LatentNorm(scale=scale, mean=s["mean"], std=s["std"], multiplier=multiplier, source=s["file"])
