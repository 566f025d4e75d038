"""Task objects: what a job trains and how its loss is computed.

One trainer (:mod:`usp_scale.training.trainer`) runs every task. A task builds the model (from
scratch; ``checkpoint.init_from`` loads transferred or exported weights), its parameter groups,
and the per-micro-batch loss from a batch ``{"latents": (N,C,h,w), "labels": (N,)}`` and the micro-step's generator
(:mod:`usp_scale.training.rng`; every random draw of the loss uses it, ``None`` draws from the global RNGs). Forward
calls go through the engine (``engine(...)``), so the model never knows which engine wraps it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from timm.data import Mixup

from .. import runtime as D
from ..config import ConfigError
from ..config.validate import is_repa_model
from ..diffusion import create_diffusion
from ..fileio import CONTENT_KEY
from ..models import create_model
from ..runtime import seed_all
from ..transfer import load_pretrained
from ..transport import create_transport
from . import optim as O
from .repa import REPAObjective


def load_init(model: nn.Module, path: str, use_pretrain_layer: int = -1) -> None:
    """checkpoint.init_from: an MAE checkpoint is transferred, a checkpoint/export of the model itself is
    loaded strictly (:func:`usp_scale.transfer.load_pretrained`)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint.init_from={path}: file not found")
    report = load_pretrained(model, path, use_pretrain_layer=use_pretrain_layer)
    if path.endswith(".safetensors"):  # what was loaded: the export's source and content hash, before training
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        info = ", ".join(f"{k} {meta[k]}" for k in ("task", "model", "step", "source") if k in meta)
        print(f"[usp_scale] init_from {path}: {info or 'no provenance metadata'}; content sha256 "
              f"{meta.get(CONTENT_KEY, 'not recorded')[:16]}", flush=True)
    if report is not None:
        parts = [f"{k} {len(getattr(report, k))}" for k in ("copied", "resampled", "dropped", "new")
                 if hasattr(report, k)]
        print(f"[usp_scale] init_from {path}: transferred ({', '.join(parts)})", flush=True)


class Task:
    """What a task declares for the trainer (which names no task): its official export (:attr:`official_name`,
    :attr:`official_keys`, written by :mod:`usp_scale.training.export`), whether it has a validation loop
    (:attr:`evaluates`: the trainer builds a val loader and calls :meth:`evaluate`), and, for a generative task, the
    process its samples come from (:attr:`process`: in-training FID samples with it)."""

    name = "base"
    official_name = "checkpoint-{step}.pth"   # official export file name
    official_keys = ("model", "args")         # what the official export holds (MAE finetuning's format)
    evaluates = False
    process = None  # a GaussianDiffusion (dit) or a Transport (sit)

    def __init__(self, cfg):
        self.cfg = cfg

    def model_kwargs(self) -> dict:
        m = self.cfg.model
        return dict(img_size=m.img_size, in_chans=m.in_chans)

    def build_model(self, attn_backend: str = "sdpa", device=None) -> nn.Module:
        """The model of the job (the config's rules checked that it fits the task), with the attention spec the
        runtime resolved (:func:`usp_scale.runtime.init_runtime`). On ``device="meta"`` nothing is allocated or
        loaded (an engine that initialises after sharding fills it from rank 0's build)."""
        model = create_model(self.cfg.model.name, device=device, kernels=self.cfg.model.kernels,
                             attn_backend=attn_backend, **self.model_kwargs())
        if self.cfg.checkpoint.init_from and device != "meta":
            load_init(model, self.cfg.checkpoint.init_from, self.cfg.dit.use_pretrain_layer)
        return model

    def param_groups(self, module: nn.Module) -> list:
        o = self.cfg.optim
        return O.model_param_groups(module, o.weight_decay, layer_decay=o.layer_decay)

    def loss(self, engine, batch: dict, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError

    def train_flops_per_sample(self, model: nn.Module) -> float:
        """Training FLOPs of one sample (for MFU): forward + backward = 3 x forward (+1 forward with activation
        checkpointing), the forward from the model (:meth:`~usp_scale.models.contract.LatentTransformer.
        flops_per_sample`)."""
        return self._passes() * float(model.flops_per_sample())

    def _passes(self) -> float:
        return 4.0 if self.cfg.engine.activation_checkpointing else 3.0

    def evaluate(self, engine, loader) -> dict:
        return {}

    def prepare_loader(self, loader, device):
        """The training loader as the task needs it (REPA attaches its teacher tokens); returns it."""
        return loader

    def window_metrics(self, world: int) -> dict:
        """Task-specific means over the log window, merged into the metrics record (collective); reset on call."""
        return {}


class PretrainTask(Task):
    """Masked latent modelling (docs/method.md §2): the model returns (loss, pred, mask)."""

    name = "pretrain"
    official_keys = ("model",)

    def model_kwargs(self):
        m = self.cfg.model
        kw = dict(img_size=m.img_size, in_chans=m.in_chans, norm_pix_loss=m.norm_pix_loss)
        if m.norm_image:
            kw["norm_image"] = True
        return kw

    def loss(self, engine, batch, generator=None):
        x = batch["latents"]
        n = x.shape[0]
        # The masking noise (N, L) is drawn here (after t and eps), so the model's argsort-of-noise masking uses the
        # step's generator; with generator=None the draws are the global ones the model itself would make.
        num_patches = engine.unwrapped.num_patches
        target = None
        if self.cfg.mask.add_noise:
            # input = sqrt(t) z + sqrt(1-t) eps, t ~ U[0.5, 1); the loss target is the clean z, as in the official code
            t = torch.rand(n, 1, 1, 1, device=x.device, generator=generator) * 0.5 + 0.5
            eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            x, target = t.sqrt() * x + (1 - t).sqrt() * eps, x
        noise = torch.rand(n, num_patches, device=x.device, generator=generator)
        loss, _, _ = engine(x, mask_ratio=self.cfg.mask.ratio, noise=noise, target=target)
        return loss

    def train_flops_per_sample(self, model: nn.Module) -> float:
        """As :meth:`Task.train_flops_per_sample`, with the encoder on the tokens ``mask.ratio`` leaves visible."""
        return self._passes() * float(model.flops_per_sample(mask_ratio=self.cfg.mask.ratio))


class DiTTask(Task):
    """DDPM finetuning (docs/method.md §4.2): uniform integer t, label dropout inside the model."""

    name = "dit"
    official_name = "{step:07d}.pt"
    official_keys = ("model", "ema", "opt", "args")

    def __init__(self, cfg, diffusion=None):
        super().__init__(cfg)
        self.diffusion = self.process = diffusion or create_diffusion(learn_sigma=cfg.model.learn_sigma)

    def model_kwargs(self):
        m = self.cfg.model
        return dict(input_size=m.img_size, in_channels=m.in_chans, num_classes=m.num_classes,
                    learn_sigma=m.learn_sigma, class_dropout_prob=m.class_dropout_prob)

    def model_kwargs_for(self, y: torch.Tensor, generator=None) -> dict:
        """``y`` and, with label dropout, the dropped labels drawn from ``generator`` (``force_drop_ids``: the
        model's own draw, ``rand < class_dropout_prob``, made here)."""
        kw = dict(y=y)
        p = self.cfg.model.class_dropout_prob
        if p > 0:
            kw["force_drop_ids"] = (torch.rand(y.shape[0], device=y.device, generator=generator) < p).long()
        return kw

    def loss(self, engine, batch, generator=None):
        x, y = batch["latents"], batch["labels"]
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device, generator=generator)
        return self.diffusion.training_losses(engine, x, t, self.model_kwargs_for(y, generator),
                                              generator=generator)["loss"].mean()


class SiTTask(DiTTask):
    """Flow finetuning (docs/method.md §4.3): linear path, velocity prediction, t ~ U[0, 1); SiT or LightningDiT
    (docs/method.md §10: ``dit.time_sampling=logit_normal``, ``dit.cosine_loss``)."""

    name = "sit"

    def __init__(self, cfg, transport=None):
        Task.__init__(self, cfg)
        self.transport = self.process = transport or create_transport(time_sampling=cfg.dit.time_sampling,
                                                                      cosine_loss=cfg.dit.cosine_loss)
        self._parts, self._n = None, 0     # with the cosine loss: sums of (MSE, cosine) over the log window

    def loss(self, engine, batch, generator=None):
        kw = self.model_kwargs_for(batch["labels"], generator)
        out = self.transport.training_losses(engine, batch["latents"], kw, generator=generator)
        if "cos_loss" in out:   # kept on the device (no host sync per step); read at logging time
            parts = torch.stack([out["mse"].detach().mean(), out["cos_loss"].detach().mean()]).double()
            self._parts = parts if self._parts is None else self._parts + parts
            self._n += 1
        return out["loss"].mean()

    def window_metrics(self, world: int) -> dict:
        """With ``dit.cosine_loss``: the window means of the loss's two parts, ``mse_loss`` and ``cos_loss`` (their
        sum is ``loss``), over the micro-batches since the last call, averaged over ranks (collective)."""
        if self._parts is None:
            return {}
        s = self._parts / self._n
        if world > 1:
            dist.all_reduce(s)
            s = s / world
        self._parts, self._n = None, 0
        return {"mse_loss": float(s[0]), "cos_loss": float(s[1])}


def _topk(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list:
    k = min(max(ks), logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (N, k)
    hit = top.eq(labels[:, None])
    return [hit[:, :min(kk, k)].any(1).float().sum() for kk in ks]


class ClsTask(Task):
    """Classification finetuning (docs/method.md §6.2): avg pooling, layer decay, label smoothing, mixup/cutmix on latents."""

    name = "cls"
    evaluates = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.mixup_fn = None
        if cfg.cls.mixup > 0 or cfg.cls.cutmix > 0:
            self.mixup_fn = Mixup(mixup_alpha=cfg.cls.mixup, cutmix_alpha=cfg.cls.cutmix,
                                  label_smoothing=cfg.cls.smoothing,
                                  num_classes=cfg.model.num_classes)

    def model_kwargs(self):
        m = self.cfg.model
        return dict(img_size=m.img_size, in_chans=m.in_chans, num_classes=m.num_classes,
                    drop_path_rate=m.drop_path_rate, global_pool=m.global_pool)

    def loss(self, engine, batch, generator=None):
        x, y = batch["latents"], batch["labels"]
        if generator is not None and (self.mixup_fn is not None or self.cfg.model.drop_path_rate > 0):
            seed_all(generator.initial_seed())  # timm's Mixup and drop-path take no generator
        if self.mixup_fn is not None:
            x, soft = self.mixup_fn(x, y)  # soft targets with smoothing folded in
            logits = engine(x)
            return torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        logits = engine(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.cls.smoothing)

    @torch.no_grad()
    def evaluate(self, engine, loader) -> dict:
        model = engine.model
        was_training = model.training
        model.eval()
        stats = torch.zeros(4, dtype=torch.float64, device=engine.device)  # top1, top5, n, loss-sum
        for batch in loader:
            x, y = batch["latents"], batch["labels"]
            with engine.autocast():
                logits = model(x)
            t1, t5 = _topk(logits.float(), y)
            stats += torch.stack([t1.double(), t5.double(), torch.tensor(float(len(y)), dtype=torch.float64,
                                  device=stats.device), F.cross_entropy(logits.float(), y, reduction="sum").double()])
        if D.get_world_size() > 1:
            dist.all_reduce(stats)
        model.train(was_training)
        n = max(stats[2].item(), 1.0)
        return {"top1": 100.0 * stats[0].item() / n, "top5": 100.0 * stats[1].item() / n,
                "val_loss": stats[3].item() / n, "val_samples": int(stats[2].item())}


class LinprobeTask(ClsTask):
    """Linear probe (docs/method.md §6.3): frozen encoder, BatchNorm1d(affine=False, eps 1e-6) + Linear head, LARS."""

    name = "linprobe"

    def __init__(self, cfg):
        Task.__init__(self, cfg)
        self.mixup_fn = None

    def model_kwargs(self):
        m = self.cfg.model
        # linprobe=True: the model builds its BatchNorm1d(affine=False) + Linear head
        return dict(img_size=m.img_size, in_chans=m.in_chans, num_classes=m.num_classes, global_pool=m.global_pool,
                    linprobe=True)

    def build_model(self, attn_backend: str = "sdpa", device=None):
        model = super().build_model(attn_backend, device)
        if not (isinstance(getattr(model, "head", None), nn.Sequential) and isinstance(model.head[0], nn.BatchNorm1d)):
            raise ConfigError(f"task=linprobe: model {self.cfg.model.name} has no BatchNorm1d + Linear 'head'")
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith("head.")
        return model

    def loss(self, engine, batch, generator=None):
        return F.cross_entropy(engine(batch["latents"]).float(), batch["labels"])

    def train_flops_per_sample(self, model: nn.Module) -> float:
        """Only the head trains: the forward of the whole model, then the head's weight gradient (one head forward;
        its input comes from the frozen encoder and needs no gradient, and nothing flows back into the encoder, so
        activation checkpointing recomputes nothing). About a third of the 3 x forward counted for the others."""
        return float(model.flops_per_sample()) + float(model.head_flops_per_sample())


TASKS = {"pretrain": PretrainTask, "dit": DiTTask, "sit": SiTTask, "cls": ClsTask, "linprobe": LinprobeTask}


# ---------------------------------------------------------------------------- REPA (usp_scale/training/repa.py)
class _REPAMixin:
    """``repa.enabled``: the task's diffusion loss on a ``*-REPA`` model + proj_coeff x REPA's projection loss
    (:class:`usp_scale.training.repa.REPAObjective` holds the teacher tokens, the loss and the time convention)."""

    def _init_repa(self):
        self.repa = REPAObjective(self.cfg)

    def model_kwargs(self):
        return self.repa.model_kwargs(super().model_kwargs())

    def prepare_loader(self, loader, device):
        return self.repa.attach(loader, device)

    def loss(self, engine, batch, generator=None):
        cap = self.repa.capture(engine)
        return self.repa.total(super().loss(cap, batch, generator), cap, batch)

    def train_flops_per_sample(self, model: nn.Module) -> float:
        return self.repa.train_flops_per_sample(super().train_flops_per_sample(model))

    def window_metrics(self, world: int) -> dict:
        """The diffusion task's parts (e.g. ``mse_loss``/``cos_loss`` with dit.cosine_loss) and ``proj_loss``; both
        collective, called in the same order on every rank."""
        return {**super().window_metrics(world), **self.repa.window_metrics(world)}


class REPADiTTask(_REPAMixin, DiTTask):
    """DDPM finetuning with REPA's projector and loss -- ours: REPA defines the method on SiT only."""

    def __init__(self, cfg, diffusion=None):
        super().__init__(cfg, diffusion)
        self._init_repa()


class REPASiTTask(_REPAMixin, SiTTask):
    """Flow finetuning with REPA (the paper's USP + REPA row with SiT-*/2-VAE-simple-REPA; REPA alone with REPA's
    SiT-*/2-REPA in REPA's time convention)."""

    def __init__(self, cfg, transport=None):
        super().__init__(cfg, transport)
        self._init_repa()


REPA_TASKS = {"dit": REPADiTTask, "sit": REPASiTTask}


def build_task(cfg, **kwargs) -> Task:
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r}: use one of {', '.join(TASKS)}")
    # the rules (config/validate.py) tie repa.enabled to a *-REPA model and task dit/sit; a tool that reads no repa
    # switch (launchers/transfer.py) builds a *-REPA model with the repa.* shapes too
    if cfg.task in REPA_TASKS and (cfg.repa.enabled or is_repa_model(cfg.model.name)):
        return REPA_TASKS[cfg.task](cfg, **kwargs)
    return TASKS[cfg.task](cfg, **kwargs)
