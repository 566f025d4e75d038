"""REPA as a training objective (docs/method.md §9): ``task=dit``/``sit`` with ``repa.enabled`` trains a ``*-REPA``
model on the diffusion loss plus ``repa.proj_coeff`` x REPA's projection loss between the model's projected tokens
(``zs``, read after block ``repa.encoder_depth``) and a frozen teacher's patch tokens of the same crop.

:class:`REPAObjective` is the part the REPA tasks (``REPADiTTask``, ``REPASiTTask`` in :mod:`.tasks`) add to the plain
DiT/SiT tasks; the diffusion loss itself is theirs, unchanged. What it owns:

- the **model's keywords**: ``encoder_depth``, ``projector_dim`` and ``z_dims`` = the teacher's width (REPA's SiT,
  ``SiT-*/2-REPA``, has no learned sigma);
- the **teacher tokens** of each batch: ``repa.features=cache`` attaches the teacher-feature cache to the latent
  cache loader (:class:`usp_scale.data.teacher_cache.TeacherFeatureCache`, checked against the loader's latent cache,
  the configured teacher's content fingerprint and the model's token count), so a batch carries
  ``teacher_tokens`` of exactly its latents' records (view and flip included); ``repa.features=online`` makes the
  online loader keep the [-1, 1] crops the VAE encoded (``images``) and runs the frozen teacher on them in the loss
  (on ``data.format=synthetic``, random latents, the loader adds a random picture per sample: the golden-loss run);
- the **time convention**: REPA's own SiT (``time_reversed``: t = 0 data, v = eps - x) is called as
  ``-model(x, 1 - t)`` inside the project's transport (t = 0 noise, v = x - eps), as the samplers do
  (usp_scale/sample/model_fn.py), so its training loss is REPA's with REPA's t = 1 - t;
- the **loss** ``diffusion + proj_coeff * proj`` (:func:`usp_scale.layers.projection_loss.repa_total_loss`; the
  cosine in fp32) and the window mean of ``proj_loss`` for the metrics records;
- the **FLOPs**: the model's forward includes the projector; the teacher's forward is added in online mode only.

The teacher is a :class:`usp_scale.models.teacher.FrozenTeacher` held here, never by the model: it is not in the
model's parameters, the optimizer, a checkpoint or an engine's wrapper, and it is loaded on every rank whole.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..config.validate import repa_teacher_input
from ..data import LatentCacheLoader, OnlineLatentLoader
from ..data.synthetic_latents import SyntheticLatentLoader
from ..data.teacher_cache import TeacherCacheError, TeacherFeatureCache
from ..layers.projection_loss import projection_loss, repa_total_loss
from ..models.teacher import TEACHERS, DINOv2ViT
from ..transfer.teachers import load_teacher

FEATURE_KEY = "teacher_tokens"   # the batch key of cached teacher tokens


class _ProjectionCapture:
    """The engine as the diffusion/transport loss calls it: returns the model's output and keeps its ``zs``; a model
    in REPA's time convention is evaluated as ``-model(x, 1 - t)`` (the project's convention)."""

    def __init__(self, engine, time_reversed: bool):
        self.engine, self.time_reversed = engine, time_reversed
        self.zs: Optional[List[torch.Tensor]] = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.time_reversed:
            out, self.zs = self.engine(x, 1 - t, **kwargs)
            return -out
        out, self.zs = self.engine(x, t, **kwargs)
        return out


def is_repas_sit(model_name: str) -> bool:
    """REPA's own SiT (``SiT-*/2-REPA``: REPA's time convention, no learned sigma), not the project's SiT/DiT with
    the projector (``*-VAE-simple-REPA``)."""
    return model_name.startswith("SiT-") and model_name.endswith("/2-REPA")


class REPAObjective:
    """REPA's part of a task: model keywords, teacher tokens, total loss, metrics, FLOPs (module docstring)."""

    def __init__(self, cfg):
        self.cfg, self.r = cfg, cfg.repa
        spec = TEACHERS[self.r.teacher]
        self.input_size = repa_teacher_input(cfg)
        self.grid = self.input_size // spec.patch_size
        self.z_dim = spec.embed_dim
        self.time_reversed = is_repas_sit(cfg.model.name)
        self.teacher = None      # loaded by attach() (online: the network runs; cache: its fingerprint is checked)
        self._sum: Optional[torch.Tensor] = None
        self._n = 0

    # ------------------------------------------------------------------ model
    def model_kwargs(self, base: dict) -> dict:
        kw = dict(base, encoder_depth=self.r.encoder_depth, projector_dim=self.r.projector_dim, z_dims=(self.z_dim,))
        if self.time_reversed:
            kw.pop("learn_sigma", None)   # REPA's SiT predicts the velocity only
        return kw

    def teacher_flops_per_image(self) -> float:
        with torch.device("meta"):
            return DINOv2ViT(TEACHERS[self.r.teacher], grid=self.grid).flops_per_image()

    def train_flops_per_sample(self, model_train_flops: float) -> float:
        """The student's training FLOPs (projector included) + the teacher's forward in online mode."""
        return model_train_flops + (self.teacher_flops_per_image() if self.r.features == "online" else 0.0)

    # ------------------------------------------------------------------ data
    def load_teacher(self, device):
        """The frozen teacher from ``repa.teacher_path`` (checked where it is read: a missing file or one that does
        not fit the architecture is an error naming the key, the file and what to put there)."""
        if self.teacher is None:
            try:
                self.teacher = load_teacher(self.r.teacher_path, name=self.r.teacher,
                                            image_size=self.cfg.data.image_size, input_size=self.input_size,
                                            device=device)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"repa.teacher_path={self.r.teacher_path!r}: {e}") from e
        return self.teacher

    def attach(self, loader, device):
        """Make ``loader``'s batches carry what the loss needs (module docstring); returns the loader."""
        r = self.r
        if r.features == "cache":
            if not isinstance(loader, LatentCacheLoader):
                raise ConfigError(f"repa.features=cache reads the teacher tokens beside a latent cache, but the "
                                  f"loader is a {type(loader).__name__}: set data.format=latents")
            teacher = self.load_teacher("cpu")   # only its content fingerprint is needed
            try:
                cache = TeacherFeatureCache(r.teacher_cache, verify=self.cfg.data.latent_verify)
                cache.check(latent_cache=loader.cache, teacher_content=teacher.content_fingerprint(),
                            tokens=self.grid * self.grid)
            except TeacherCacheError as e:
                raise TeacherCacheError(f"repa.teacher_cache={r.teacher_cache!r}: {e}") from e
            self.teacher = None          # not kept: the cached tokens are the teacher's output
            loader.record_features[FEATURE_KEY] = cache
        else:
            if not isinstance(loader, (OnlineLatentLoader, SyntheticLatentLoader)):
                raise ConfigError(f"repa.features=online runs the teacher on the batch's pixel crops, but the loader "
                                  f"is a {type(loader).__name__}: use data.format folder or wds")
            self.load_teacher(device)
            loader.keep_images = True
        return loader

    def targets(self, batch: dict) -> torch.Tensor:
        """The teacher tokens (N, T, D) of the batch's crops."""
        if self.r.features == "cache":
            return batch[FEATURE_KEY]
        return self.teacher.from_unit_range(batch["images"])

    # ------------------------------------------------------------------ loss and metrics
    def capture(self, engine) -> _ProjectionCapture:
        return _ProjectionCapture(engine, self.time_reversed)

    def total(self, diffusion_loss: torch.Tensor, cap: _ProjectionCapture, batch: dict) -> torch.Tensor:
        if cap.zs is None:
            raise RuntimeError("REPA: the model was not called by the diffusion loss (no projected tokens)")
        proj = projection_loss([self.targets(batch)], cap.zs).mean()
        d = proj.detach().double()
        self._sum = d if self._sum is None else self._sum + d
        self._n += 1
        return repa_total_loss(diffusion_loss, proj, self.r.proj_coeff)

    def window_metrics(self, world: int) -> dict:
        """Mean proj_loss over the micro-batches since the last call, averaged over ranks (collective)."""
        if self._sum is None:
            return {}
        s = self._sum / self._n
        if world > 1:
            dist.all_reduce(s)
            s = s / world
        self._sum, self._n = None, 0
        return {"proj_loss": float(s)}


__all__ = ["REPAObjective", "FEATURE_KEY", "is_repas_sit"]
