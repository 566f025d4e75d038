"""Every rule a config value must follow, checked when the config loads (and, for the few that need the world
size, at start-up: :func:`usp_scale.config.resolve.resolve_job`).

:data:`RULES` is the single list: each :class:`Rule` names the keys it reads, states itself in words (the table in
``docs/config.md`` is this list) and returns what is wrong, or None. :func:`validate` runs every load-time rule and
raises one :class:`~usp_scale.config.errors.ConfigError` listing each broken rule with every key it involves, its
value and the file (or "command line", or "default") that set it. :func:`validate_runtime` runs the rules that
need the world size. The code that reads a config trusts it: no rule is checked anywhere else.

``sections`` (of :func:`validate`): a tool that reads only some sections (``launchers/sample.py`` reads model, vae,
eval, engine and sample) runs only the rules whose keys all lie in them.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..models import create_model, list_models, model_family
from ..models.teacher import INPUT_RULES, REPA_RULE, TEACHERS
from ..vae.frozen import GEOMETRY as _VAE_GEOMETRY
from .errors import ConfigError
from .schema import OFFICIAL_PRECISION, CacheJob, JobConfig, SampleJob, TransferJob


def schema_choices(schema=JobConfig) -> Dict[str, tuple]:
    """Dotted key -> allowed values, for every choice field of ``schema`` (``opt(..., choices=...)``)."""
    out: Dict[str, tuple] = {}

    def walk(obj, prefix=""):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            elif "choices" in f.metadata:
                out[prefix + f.name] = f.metadata["choices"]
    walk(schema())
    return out


# Choices of the choice fields, as the schema declares them (string and integer choices apart, for the tests).
# every schema's: the jobs' and the tools' own sections (a tool's rules apply to its config only)
_ALL_CHOICES = {k: v for schema in (JobConfig, SampleJob, CacheJob, TransferJob) for k, v in schema_choices(schema).items()}
CHOICES: Dict[str, Tuple[str, ...]] = {k: v for k, v in _ALL_CHOICES.items() if all(isinstance(x, str) for x in v)}
INT_CHOICES: Dict[str, Tuple[int, ...]] = {k: v for k, v in _ALL_CHOICES.items() if k not in CHOICES}

# (key, low, high, low open?, high open?, what the key is); None = unbounded on that side.
RANGES: Tuple[tuple, ...] = (
    ("seed", 0, None, False, False, "a seed"),
    ("log_every", 1, None, False, False, "a step count"),
    ("peak_flops", 0, None, True, False, "FLOP/s"),
    ("max_nonfinite", 0, None, False, False, "a step count (0 = no limit)"),
    ("max_nonfinite_rate", 0, 1, False, True, "a fraction (0 = no limit)"),
    ("nonfinite_window", 1, None, False, False, "a step count"),
    ("cls.smoothing", 0, 1, False, True, "a probability mass"),
    ("cls.mixup", 0, None, False, False, "a Beta alpha (0 = off)"),
    ("cls.cutmix", 0, None, False, False, "a Beta alpha (0 = off)"),
    ("dit.use_pretrain_layer", -1, None, False, False, "a block count (-1 = all)"),
    ("eval_every_epochs", 0, None, False, False, "an epoch count"),
    ("stop_after_steps", 0, None, False, False, "a step count"),
    ("data.image_size", 1, None, False, False, "pixels"),
    ("data.crop_scale_min", 0, 1, True, False, "an area fraction"),
    ("data.batch_size", 1, None, False, False, "samples per rank"),
    ("data.global_batch_size", 0, None, False, False, "samples per optimizer step (0 = off)"),
    ("data.micro_batch_size", 0, None, False, False, "samples per rank and micro-step (0 = no bound)"),
    ("data.num_workers", 0, None, False, False, "a process count"),
    ("data.num_classes", 1, None, False, False, "a class count"),
    ("data.synthetic_samples", 1, None, False, False, "a sample count"),
    ("vae.scale", 0, None, False, False, "a scale factor (0 = the version's default)"),
    ("vae.latent_multiplier", 0, None, True, False, "a factor"),
    ("model.img_size", 1, None, False, False, "a latent side"),
    ("model.in_chans", 1, None, False, False, "a channel count"),
    ("model.num_classes", 1, None, False, False, "a class count"),
    ("model.class_dropout_prob", 0, 1, False, True, "a probability"),
    ("model.drop_path_rate", 0, 1, False, True, "a probability"),
    ("mask.ratio", 0, 1, True, True, "a fraction of tokens"),
    ("optim.lr", 0, None, False, False, "a learning rate (0 = from optim.blr)"),
    ("optim.blr", 0, None, False, False, "a learning rate per 256 samples"),
    ("optim.min_lr", 0, None, False, False, "a learning rate"),
    ("optim.weight_decay", 0, None, False, False, "a decay coefficient"),
    ("optim.beta1", 0, 1, False, True, "a moment coefficient"),
    ("optim.beta2", 0, 1, False, True, "a moment coefficient"),
    ("optim.eps", 0, None, True, False, "an epsilon"),
    ("optim.layer_decay", 0, 1, True, False, "a per-layer factor (1 = off)"),
    ("optim.clip_grad", 0, None, False, False, "a gradient norm (0 = off)"),
    ("optim.momentum", 0, 1, False, True, "a momentum coefficient"),
    ("optim.trust_coefficient", 0, None, True, False, "a trust coefficient"),
    ("schedule.epochs", 0, None, False, False, "an epoch count"),
    ("schedule.max_steps", 0, None, False, False, "a step count (0 = use epochs)"),
    ("schedule.warmup_epochs", 0, None, False, False, "an epoch count"),
    ("schedule.warmup_steps", 0, None, False, False, "a step count (0 = use warmup_epochs)"),
    ("schedule.accum_iter", 1, None, False, False, "micro-batches per optimizer step"),
    ("engine.fsdp_shard_size", 0, None, False, False, "a rank count (0 = all ranks)"),
    ("engine.timeout_min", 1, None, False, False, "minutes"),
    ("engine.train_timeout_s", 0, None, False, False, "seconds (0 = keep engine.timeout_min while training)"),
    ("engine.startup_timeout_s", 1, None, False, False, "seconds"),
    ("checkpoint.every_steps", 0, None, False, False, "a step count (0 = only at the end)"),
    ("checkpoint.keep_last", 0, None, False, False, "a folder count (0 = keep all)"),
    ("ema.decay", 0, 1, False, True, "a decay (0 = no EMA)"),
    ("eval.fid_every", 0, None, False, False, "a step count (0 = off)"),
    ("eval.fid_samples", 1, None, False, False, "a sample count"),
    ("eval.steps", 1, None, False, False, "a step count"),
    ("eval.cfg_scale", 0, None, False, False, "a guidance scale (1 = off)"),
    ("eval.cfg_channels", 0, None, False, False, "a channel count (0 = all)"),
    ("eval.ddim_eta", 0, None, False, False, "a DDIM eta"),
    ("eval.timestep_shift", 0, None, False, False, "a shift (0 = the uniform grid)"),
    ("eval.batch_size", 1, None, False, False, "samples per rank"),
    ("eval.seed", 0, None, False, False, "a seed"),
    ("sample.num_samples", 1, None, False, False, "an image count"),
    ("sample.grid", 0, None, False, False, "an image count (0 = no grid)"),
    ("sample.max_batches", 0, None, False, False, "a batch count (0 = no limit)"),
    ("sample.atol", 0, None, True, False, "a tolerance"),
    ("sample.rtol", 0, None, True, False, "a tolerance"),
    ("sample.sde_last_step", 0, None, False, False, "a time step"),
    ("cache.views", 1, None, False, False, "a view count"),
    ("cache.shard_size", 1, None, False, False, "an image count"),
    ("cache.batch_size", 1, None, False, False, "an image count"),
    ("cache.stop_after_shards", 0, None, False, False, "a shard count (0 = off)"),
    # REPA (the repa.* rules: the REPA block below)
    ("repa.encoder_depth", 1, None, False, False, "a block number (1-indexed)"),
    ("repa.proj_coeff", 0, None, False, False, "a loss weight"),
    ("repa.projector_dim", 1, None, False, False, "a width"),
    ("repa.teacher_input_size", 0, None, False, False,
     "pixels (0 = the teacher's rule: REPA's 224 x (data.image_size // 256))"),
    ("cache.stats_samples", 0, None, False, False, "a latent count (0 = every latent of the cache)"),
)
REQUIRED_STRINGS = ("output_dir", "eval.metrics_file")

# Latent geometry of the VAE versions: (channels, downsampling) (usp_scale.vae.frozen owns it).
VAE_GEOMETRY = dict(_VAE_GEOMETRY)
LABELLED_TASKS = ("dit", "sit", "cls", "linprobe")
FAMILY_OF_TASK = {"pretrain": "mae", "dit": "dit", "sit": "sit", "cls": "vit", "linprobe": "vit"}
SAMPLERS = {"dit": ("auto", "ddpm", "ddim"), "sit": ("auto", "sde", "ode", "heun", "euler")}
FAMILY_SAMPLERS = {"dit": SAMPLERS["dit"], "sit": SAMPLERS["sit"]}  # sampling a model of the family


@dataclass(frozen=True)
class Rule:
    """One rule: ``check(cfg)`` returns what is wrong (a sentence) or None."""

    keys: Tuple[str, ...]
    text: str
    check: Callable
    runtime: bool = False  # needs the world size: checked when the trainer starts

    @property
    def id(self) -> str:
        return "+".join(self.keys) + ("@start" if self.runtime else "")


def get(cfg, key: str):
    """Dotted key -> value."""
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_rule(key, lo, hi, lo_open, hi_open, what) -> Rule:
    lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {_fmt(lo)}"
    hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {_fmt(hi)}"
    text = f"{key} is {what}: " + " and ".join(s for s in (lo_s, hi_s) if s)

    def check(cfg):
        v = get(cfg, key)
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number ({text})"
        below = lo is not None and (v <= lo if lo_open else v < lo)
        above = hi is not None and (v >= hi if hi_open else v > hi)
        bad = below or above
        return f"out of range: {text}" if bad else None
    return Rule((key,), text, check)


def _choice_rule(key, options) -> Rule:
    text = f"{key} is one of {', '.join(map(str, options))}"
    return Rule((key,), text, lambda cfg: None if get(cfg, key) in options else f"unknown value: {text}")


def _required_rule(key) -> Rule:
    text = f"{key} is not empty"
    return Rule((key,), text, lambda cfg: None if str(get(cfg, key)).strip() else "must be set (it is empty)")


RULES: List[Rule] = ([_choice_rule(k, v) for k, v in {**CHOICES, **INT_CHOICES}.items()] +
                     [_range_rule(*r) for r in RANGES] + [_required_rule(k) for k in REQUIRED_STRINGS])


def rule(*keys: str, text: str, runtime: bool = False):
    """Register a cross-key rule (the decorated function takes the config, or config and world size)."""
    def deco(fn):
        RULES.append(Rule(tuple(keys), text, fn, runtime))
        return fn
    return deco


# --------------------------------------------------------------------------- model names and geometry

def model_patch_size(name: str) -> Optional[int]:
    """Patch size of a registered model name (None when the name is not registered)."""
    if name not in list_models():
        return None
    m = re.search(r"/(\d+)", name)
    if m:
        return int(m.group(1))  # DiT-XL/2, SiT-B/4-...
    return 4 if name.endswith("_patch_vae_2") else 2  # vit_*_patch_vae (2), vit_*_patch_vae_2 (4), *_patch16_vae (2)


@rule("model.name", text="model.name is a registered model (usp_scale.models.list_models())")
def _model_registered(cfg):
    if cfg.model.name in list_models():
        return None
    close = difflib.get_close_matches(cfg.model.name, list_models(), n=3)
    return "unknown model" + (f"; did you mean {', '.join(close)}?" if close else "")


@rule("task", "model.name", text="the model family fits the task: pretrain -> an MAE (vit_*_patch_vae), dit -> DiT-*, "
      "sit -> SiT-*, cls/linprobe -> a classifier (vit_*_patch16_vae)")
def _model_family(cfg):
    if cfg.model.name not in list_models() or cfg.task not in FAMILY_OF_TASK:
        return None
    fam, want = model_family(cfg.model.name), FAMILY_OF_TASK[cfg.task]
    if fam == want or fam in EXTRA_FAMILIES_OF_TASK.get(cfg.task, ()):
        return None
    return f"task={cfg.task} needs a {want} model, {cfg.model.name} is a {fam} model"


@rule("model.img_size", "model.name", text="model.img_size is a multiple of the model's patch size")
def _patch(cfg):
    p = model_patch_size(cfg.model.name)
    if p is None or cfg.model.img_size % p == 0:
        return None
    return f"a latent side of {cfg.model.img_size} is not a multiple of the patch size {p} of {cfg.model.name}"


@rule("data.image_size", "vae.version", "model.img_size", "data.format",
      text="unless data.format=synthetic: data.image_size is a multiple of the VAE downsampling (8 for d8, 16 for d16 "
           "and f16d32) "
           "and model.img_size = data.image_size / downsampling")
def _latent_side(cfg):
    if cfg.data.format == "synthetic" or cfg.vae.version not in VAE_GEOMETRY:
        return None
    ds = VAE_GEOMETRY[cfg.vae.version][1]
    if cfg.data.image_size % ds:
        return f"{cfg.data.image_size} px is not a multiple of the {cfg.vae.version} VAE's downsampling {ds}"
    if cfg.data.image_size // ds != cfg.model.img_size:
        return (f"{cfg.data.image_size} px images give {cfg.data.image_size // ds}x{cfg.data.image_size // ds} "
                f"{cfg.vae.version} latents, the model expects {cfg.model.img_size}x{cfg.model.img_size}: set "
                f"model.img_size={cfg.data.image_size // ds} or data.image_size={cfg.model.img_size * ds}")
    return None


@rule("model.in_chans", "vae.version", "data.format",
      text="unless data.format=synthetic: model.in_chans is the VAE's latent channels (4 for d8, 16 for d16, 32 for "
           "f16d32)")
def _latent_channels(cfg):
    if cfg.data.format == "synthetic" or cfg.vae.version not in VAE_GEOMETRY:
        return None
    ch = VAE_GEOMETRY[cfg.vae.version][0]
    return None if cfg.model.in_chans == ch else f"the {cfg.vae.version} VAE gives {ch}-channel latents"


@rule("data.num_classes", "model.num_classes", "task",
      text="for dit, sit, cls and linprobe: data.num_classes = model.num_classes (labels index the model's classes)")
def _classes(cfg):
    if cfg.task not in LABELLED_TASKS or cfg.data.num_classes == cfg.model.num_classes:
        return None
    return f"the data has {cfg.data.num_classes} classes, the model {cfg.model.num_classes}"


@rule("mask.ratio", "model.img_size", "model.name", "task",
      text="for pretrain: the mask keeps at least one token and removes at least one "
           "(int(L * (1 - mask.ratio)) in [1, L - 1], L = (model.img_size / patch)^2)")
def _mask_tokens(cfg):
    p = model_patch_size(cfg.model.name)
    if cfg.task != "pretrain" or p is None or cfg.model.img_size % p or not 0 < cfg.mask.ratio < 1:
        return None
    tokens = (cfg.model.img_size // p) ** 2
    kept = int(tokens * (1 - cfg.mask.ratio))
    if 1 <= kept <= tokens - 1:
        return None
    return f"of {tokens} tokens the mask keeps {kept}; the encoder needs one and the loss one removed"


@rule("model.norm_image", "model.norm_pix_loss", text="model.norm_image needs model.norm_pix_loss")
def _norm_image(cfg):
    return "the per-image target is a variant of the norm-pix target" \
        if cfg.model.norm_image and not cfg.model.norm_pix_loss else None


# --------------------------------------------------------------------------- data

@rule("data.root", "data.format", text="data.root is set for data.format folder and wds")
def _root(cfg):
    return "a folder or tar dataset needs its root folder" \
        if cfg.data.format in ("folder", "wds") and not cfg.data.root.strip() else None


@rule("vae.path", "data.format", "eval.fid_every",
      text="vae.path is set unless data.format=synthetic and eval.fid_every=0 (a job that encodes images, reads a "
           "latent cache or decodes samples names its VAE; there is no default VAE)")
def _vae_path(cfg):
    if cfg.vae.path.strip() or (cfg.data.format == "synthetic" and cfg.eval.fid_every == 0):
        return None
    return ("no VAE given: set vae.path to a local diffusers folder or weights file, or a shipped name "
            "(synthetic-f8; tiny-random, a seeded random VAE, for tests)")


@rule("data.latent_cache", "data.format", text="data.latent_cache is set for data.format=latents")
def _cache(cfg):
    return "the latent cache folder (written by launchers/cache_latents.py) is needed" \
        if cfg.data.format == "latents" and not cfg.data.latent_cache.strip() else None


# --------------------------------------------------------------------------- optimizer and schedule

@rule("optim.lr", "optim.blr", text="optim.lr > 0 or optim.blr > 0 (the learning rate is not 0)")
def _lr_set(cfg):
    return "both are 0: no learning rate" if cfg.optim.lr == 0 and cfg.optim.blr == 0 else None


@rule("optim.min_lr", "optim.lr", text="with optim.lr > 0: optim.min_lr <= optim.lr")
def _min_lr(cfg):
    return "the cosine floor is above the peak" if 0 < cfg.optim.lr < cfg.optim.min_lr else None


@rule("schedule.epochs", "schedule.max_steps", text="schedule.epochs > 0 or schedule.max_steps > 0")
def _length(cfg):
    return "the training has no length" if cfg.schedule.epochs == 0 and cfg.schedule.max_steps == 0 else None


@rule("schedule.warmup_steps", "schedule.max_steps", "schedule.warmup_epochs", "schedule.epochs",
      text="warmup is not longer than training: warmup_steps <= max_steps (both set), warmup_epochs <= epochs "
           "(both in epochs)")
def _warmup(cfg):
    s = cfg.schedule
    if s.max_steps > 0 and s.warmup_steps > s.max_steps:
        return f"{s.warmup_steps} warmup steps in a {s.max_steps}-step run"
    if s.max_steps == 0 and s.warmup_steps == 0 and s.warmup_epochs > s.epochs:
        return f"{_fmt(s.warmup_epochs)} warmup epochs in a {s.epochs}-epoch run"
    return None


# --------------------------------------------------------------------------- engine, checkpoint, evaluation

@rule("engine.ddp_bf16_grads", text="engine.ddp_bf16_grads is false (replaced by engine.reduce_dtype)")
def _ddp_bf16_grads(cfg):
    return "replaced by engine.reduce_dtype: set engine.reduce_dtype=bf16 (and drop engine.ddp_bf16_grads)" \
        if cfg.engine.ddp_bf16_grads else None


@rule("engine.precision", "engine.reduce_dtype",
      text="engine.precision=official reduces gradients in fp32 (the official code): engine.reduce_dtype=fp32")
def _official_reduce(cfg):
    if cfg.engine.precision == "official" and cfg.engine.reduce_dtype != "fp32":
        return ("set engine.precision to fp32/fp16/bf16 to reduce in bf16, or drop engine.reduce_dtype "
                "(engine.precision=official reduces gradients in fp32)")
    return None


@rule("engine.fp8", "engine.name", text="engine.fp8 is off with engine.name=deepspeed (local, ddp and fsdp2 run it)")
def _fp8_engine(cfg):
    return f"engine.fp8={cfg.engine.fp8} is supported with the local, ddp and fsdp2 engines, not deepspeed" \
        if cfg.engine.fp8 != "off" and cfg.engine.name == "deepspeed" else None


@rule("engine.fp8", "engine.precision", "task",
      text="engine.fp8 runs with bf16 or fp32 autocast: not with engine.precision=fp16 (nor official where the "
           "task's official precision is fp16: pretrain, cls, linprobe)")
def _fp8_precision(cfg):
    p = cfg.engine.precision
    if p == "official" and cfg.task in OFFICIAL_PRECISION:
        p = OFFICIAL_PRECISION[cfg.task][0]
    return f"engine.fp8={cfg.engine.fp8} needs engine.precision bf16 or fp32, this job runs {p}" \
        if cfg.engine.fp8 != "off" and p == "fp16" else None


@rule("engine.deepspeed_config", "engine.name", text="engine.deepspeed_config is set only with engine.name=deepspeed")
def _ds_json(cfg):
    return "a DeepSpeed JSON needs engine.name=deepspeed" \
        if cfg.engine.deepspeed_config and cfg.engine.name != "deepspeed" else None


@rule("checkpoint.strict_keys", text="checkpoint.strict_keys lists config sections or dotted keys that exist")
def _strict_keys(cfg):
    bad = [k.strip() for k in cfg.checkpoint.strict_keys.split(",") if k.strip() and not _has(cfg, k.strip())]
    return f"no such key(s): {', '.join(bad)}" if bad else None


@rule("eval.fid_every", "task", text="eval.fid_every > 0 only for task dit or sit")
def _fid_task(cfg):
    return f"in-training FID is for task=dit or sit, task={cfg.task} generates no images" \
        if cfg.eval.fid_every > 0 and cfg.task not in SAMPLERS else None


@rule("eval.fid_reference", "eval.fid_every",
      text="with eval.fid_every > 0: eval.fid_reference is set (a folder of images, an image .npz or a statistics "
           ".npz)")
def _fid_reference(cfg):
    return ("in-training FID needs a reference: a folder of images, an image .npz (arr_0) or a statistics .npz "
            "(mu, sigma), e.g. written by launchers/evaluate.py --save-stats")  \
        if cfg.eval.fid_every > 0 and not cfg.eval.fid_reference.strip() else None


@rule("eval.fid_samples", "eval.fid_every", text="with eval.fid_every > 0: eval.fid_samples >= 2 (a covariance)")
def _fid_samples(cfg):
    return "FID needs at least 2 samples" if cfg.eval.fid_every > 0 and cfg.eval.fid_samples < 2 else None


@rule("eval.sampler", "task", "eval.fid_every",
      text="with eval.fid_every > 0: eval.sampler fits the task (dit: auto, ddpm, ddim; sit: auto, sde, ode, heun, "
           "euler)")
def _sampler(cfg):
    if cfg.eval.fid_every == 0 or cfg.task not in SAMPLERS or cfg.eval.sampler in SAMPLERS[cfg.task]:
        return None
    return f"task={cfg.task} samples with {', '.join(SAMPLERS[cfg.task])}"


@rule("eval.cfg_channels", "model.in_chans", text="eval.cfg_channels <= model.in_chans (0 = all latent channels)")
def _cfg_channels(cfg):
    return f"only {cfg.model.in_chans} latent channels exist" if cfg.eval.cfg_channels > cfg.model.in_chans else None


@rule("eval.cfg_scale", "model.class_dropout_prob", "eval.fid_every",
      text="with eval.fid_every > 0 and eval.cfg_scale != 1: model.class_dropout_prob > 0 (CFG needs the null "
           "class trained by label dropout)")
def _cfg_null(cfg):
    if cfg.eval.fid_every > 0 and cfg.eval.cfg_scale != 1.0 and cfg.model.class_dropout_prob == 0:
        return "the model has no null class to guide against"
    return None


# --------------------------------------------------------------------------- REPA (repa.*; usp_scale/training/repa.py)

REPA_TASKS = ("dit", "sit")


def is_repa_model(name: str) -> bool:
    """A registered model with REPA's projector (forward -> (output, zs))."""
    return name in list_models() and name.endswith("-REPA")


def model_depth(name: str) -> Optional[int]:
    """Number of blocks of a registered model (built on the meta device: nothing allocated); None if unknown."""
    if name not in list_models():
        return None
    return len(getattr(create_model(name, device=torch.device("meta")), "blocks", ()))


def repa_teacher_input(cfg) -> int:
    """The teacher's input side: repa.teacher_input_size, or the teacher's rule: REPA's 224 x (data.image_size //
    256) for DINOv2, 56 x (data.image_size // 64) for the shipped synthetic-vit (models/teacher.py INPUT_RULES)."""
    if cfg.repa.teacher_input_size:
        return cfg.repa.teacher_input_size
    side, per = INPUT_RULES.get(cfg.repa.teacher, REPA_RULE)
    return side * (cfg.data.image_size // per)


@rule("repa.enabled", "task", "model.name",
      text="repa.enabled runs with task dit or sit and a *-REPA model (SiT-*/2-REPA, SiT-*/2-VAE-simple-REPA, "
           "DiT-*/2-VAE-simple-REPA); a *-REPA model trains only with repa.enabled")
def _repa_model(cfg):
    r, repa_model = cfg.repa, is_repa_model(cfg.model.name)
    if r.enabled and cfg.task not in REPA_TASKS:
        return f"REPA is defined for the diffusion tasks (dit, sit), not task={cfg.task}"
    if r.enabled and cfg.model.name in list_models() and not repa_model:
        return (f"{cfg.model.name} has no REPA projector: use its -REPA variant (e.g. SiT-XL/2-REPA, "
                f"SiT-XL/2-VAE-simple-REPA)")
    if repa_model and not r.enabled and cfg.task in REPA_TASKS:
        return f"{cfg.model.name} returns (output, projected tokens): set repa.enabled=true to train it"
    return None


@rule("model.learn_sigma", "model.name",
      text="a model without a learned-sigma output (REPA's SiT SiT-*/2-REPA, LightningDiT-*) has "
           "model.learn_sigma=false: it predicts the velocity only")
def _no_sigma_output(cfg):
    n = cfg.model.name
    if not cfg.model.learn_sigma:
        return None
    if is_repa_model(n) and n.startswith("SiT-") and n.endswith("/2-REPA"):
        return f"{n} has no learned-sigma output (REPA's SiT: out channels = in channels): set model.learn_sigma=false"
    if n in list_models() and model_family(n) == "lightningdit":
        return f"{n} has no learned sigma: set model.learn_sigma=false"
    return None


@rule("repa.encoder_depth", "model.name", "repa.enabled",
      text="with repa.enabled: repa.encoder_depth lies in 1..the model's depth")
def _repa_depth(cfg):
    if not cfg.repa.enabled or not is_repa_model(cfg.model.name):
        return None
    depth = model_depth(cfg.model.name)
    if depth and not 1 <= cfg.repa.encoder_depth <= depth:
        return (f"{cfg.model.name} has {depth} blocks: the projector reads the output of block 1..{depth} "
                "(REPA: 8 for SiT-L/XL, 4 for B)")
    return None


@rule("repa.teacher_path", "repa.enabled",
      text="with repa.enabled: repa.teacher_path names the teacher's local weights (nothing is downloaded)")
def _repa_teacher_path(cfg):
    if cfg.repa.enabled and not cfg.repa.teacher_path.strip():
        return ("set repa.teacher_path to the local dinov2_vitb14_pretrain.pth (torch.hub's file) or timm's "
                "vit_base_patch14_dinov2 model.safetensors, e.g. weights/dinov2_vitb14_pretrain.pth")
    return None


@rule("repa.features", "data.format", "repa.teacher_cache", "repa.enabled",
      text="with repa.enabled: repa.features=cache reads data.format=latents and a repa.teacher_cache; "
           "repa.features=online needs the pixels, data.format folder or wds (synthetic: random pictures, tests)")
def _repa_features(cfg):
    r = cfg.repa
    if not r.enabled:
        return None
    if r.features == "cache":
        if cfg.data.format != "latents":
            return (f"cached teacher tokens are read beside a latent cache: set data.format=latents (with "
                    f"data.latent_cache), or repa.features=online to run the teacher on data.format={cfg.data.format}")
        if not r.teacher_cache.strip():
            return ("set repa.teacher_cache to the teacher-feature cache written beside data.latent_cache "
                    "(usp_scale.data.teacher_cache), or use repa.features=online")
    elif cfg.data.format not in ("folder", "wds", "synthetic"):
        return (f"the online teacher runs on the batch's pixels, data.format={cfg.data.format} has none: use a "
                "folder or wds dataset, or repa.features=cache with a teacher-feature cache")
    return None


@rule("repa.teacher", "repa.teacher_input_size", "data.image_size", "model.img_size", "model.name", "repa.enabled",
      text="with repa.enabled: the teacher's token grid (repa.teacher_input_size, 0 = 224 x (data.image_size // "
           "256), 56 x (data.image_size // 64) for synthetic-vit, over the teacher's patch size) equals the model's "
           "(model.img_size / patch size)")
def _repa_tokens(cfg):
    r = cfg.repa
    p = model_patch_size(cfg.model.name)
    if not r.enabled or p is None or r.teacher not in TEACHERS or cfg.model.img_size % p:
        return None
    size, tp = repa_teacher_input(cfg), TEACHERS[r.teacher].patch_size
    grid = cfg.model.img_size // p
    if size < 1 or size % tp or size // tp != grid:
        want = grid * tp
        have = ("is empty" if size < 1 else f"is {size} px = {size / tp:g} patches of {tp} px")
        return (f"the teacher input {have}, the model has a {grid}x{grid} token grid: set "
                f"repa.teacher_input_size={want} ({grid} x {tp} px)")
    return None


# --------------------------------------------------------------------------- the tool launchers' own rules

@rule("vae.path", "sample.out_dir",
      text="launchers/sample.py: vae.path names the VAE that decodes the samples (\"none\" for a model in pixel space)")
def _sample_vae(cfg):
    return None if cfg.vae.path.strip() else ("no VAE given: set vae.path (--vae) to a local diffusers folder or "
                                              "weights file, a shipped name (synthetic-f8), or none")


@rule("model.name", "sample.out_dir", text="launchers/sample.py: model.name is a DiT or SiT")
def _sample_family(cfg):
    if cfg.model.name not in list_models():
        return None
    fam = model_family(cfg.model.name)
    return None if fam in FAMILY_SAMPLERS else f"{cfg.model.name} is a {fam} model: sampling needs a DiT or SiT"


@rule("eval.sampler", "model.name", "sample.out_dir",
      text="launchers/sample.py: eval.sampler fits the model (DiT: auto, ddpm, ddim; SiT: auto, sde, ode, heun, "
           "euler)")
def _sample_sampler(cfg):
    if cfg.model.name not in list_models() or model_family(cfg.model.name) not in FAMILY_SAMPLERS:
        return None
    ok = FAMILY_SAMPLERS[model_family(cfg.model.name)]
    return None if cfg.eval.sampler in ok else f"{cfg.model.name} samples with {', '.join(ok)}"


@rule("vae.path", "cache.out", text="launchers/cache_latents.py: vae.path names the VAE that encodes the cache")
def _cache_vae(cfg):
    return None if cfg.vae.path.strip() else ("no VAE given: set vae.path (--vae-path) to a local diffusers folder "
                                              "or weights file, or a shipped name (synthetic-f8; tiny-random for tests)")


@rule("data.format", "cache.out", text="launchers/cache_latents.py encodes images: data.format is folder or wds")
def _cache_format(cfg):
    return None if cfg.data.format in ("folder", "wds") else "the cache is encoded from a folder or tar dataset"


@rule("data.root", "cache.out", text="launchers/cache_latents.py: data.root is set")
def _cache_root(cfg):
    return None if cfg.data.root.strip() else "the dataset to encode (--data-root) is needed"


# --------------------------------------------------------------------------- VA-VAE latents and LightningDiT (issue 21)
# task=sit also trains LightningDiT (the same transport, LightningDiT's options in the dit section); sampling a
# LightningDiT uses the SiT samplers.
EXTRA_FAMILIES_OF_TASK = {"sit": ("lightningdit",)}
FAMILY_SAMPLERS["lightningdit"] = SAMPLERS["sit"]


def _needs_stats(cfg) -> Optional[str]:
    if cfg.vae.version == "f16d32" and not cfg.vae.latent_stats.strip():
        return ("VA-VAE latents are normalised per channel (LightningDiT does not train on them without it): set "
                "vae.latent_stats to the latent cache folder (launchers/cache_latents.py writes its "
                "latent_stats.json) or to LightningDiT's latents_stats.pt")
    return None


@rule("vae.latent_stats", "vae.version", "data.format", "eval.fid_every",
      text="vae.version=f16d32 names its channel statistics in vae.latent_stats, unless data.format=synthetic and "
           "eval.fid_every=0 (nothing encoded or decoded)")
def _vavae_stats(cfg):
    return None if cfg.data.format == "synthetic" and cfg.eval.fid_every == 0 else _needs_stats(cfg)


@rule("vae.latent_stats", "vae.version", "sample.out_dir",
      text="launchers/sample.py: vae.version=f16d32 names its channel statistics in vae.latent_stats (the decoder "
           "inverts the training normalisation)")
def _sample_vavae_stats(cfg):
    return None if cfg.vae.path.strip().lower() == "none" else _needs_stats(cfg)


@rule("vae.latent_stats", "vae.scale",
      text="with vae.latent_stats: vae.scale is 0 (the statistics replace the scale factor)")
def _stats_scale(cfg):
    return "the channel statistics replace the scale factor: drop vae.scale or vae.latent_stats" \
        if cfg.vae.latent_stats.strip() and cfg.vae.scale != 0 else None


@rule("vae.latent_multiplier", "vae.latent_stats",
      text="vae.latent_multiplier != 1 only with vae.latent_stats (it multiplies the normalised latents)")
def _multiplier(cfg):
    return "the multiplier applies after the channel normalisation: set vae.latent_stats (or vae.scale instead)" \
        if cfg.vae.latent_multiplier != 1.0 and not cfg.vae.latent_stats.strip() else None


@rule("dit.time_sampling", "dit.cosine_loss", "task",
      text="dit.time_sampling=logit_normal and dit.cosine_loss are options of task=sit (the flow transport)")
def _flow_options(cfg):
    if cfg.task != "sit" and (cfg.dit.time_sampling != "uniform" or cfg.dit.cosine_loss):
        return f"task={cfg.task} has no flow transport: use task=sit, or the defaults (uniform, no cosine loss)"
    return None


@rule("eval.timestep_shift", "eval.sampler",
      text="eval.timestep_shift > 0 only with eval.sampler heun or euler (a fixed time grid)")
def _shift_sampler(cfg):
    return f"eval.sampler={cfg.eval.sampler} has no fixed time grid to shift: use euler or heun" \
        if cfg.eval.timestep_shift > 0 and cfg.eval.sampler not in ("heun", "euler") else None


# --------------------------------------------------------------------------- rules that need the world size

@rule("engine.name", text="engine.name=local runs one process (use ddp, fsdp2 or deepspeed for more)", runtime=True)
def _local(cfg, world):
    return f"the launcher started {world} processes" if cfg.engine.name == "local" and world > 1 else None


@rule("engine.fsdp_shard_size", "engine.name",
      text="with engine.name=fsdp2: engine.fsdp_shard_size divides the world size",
      runtime=True)
def _hsdp(cfg, world):
    k = cfg.engine.fsdp_shard_size
    if cfg.engine.name == "fsdp2" and k > 0 and (k > world or world % k):
        return f"{k} does not divide the world size {world} (e.g. use the GPUs per node; 0 = all ranks)"
    return None


@rule("optim.min_lr", "optim.blr", "optim.lr", "data.batch_size", "schedule.accum_iter",
      text="with optim.lr = 0: optim.min_lr <= optim.blr x data.batch_size x schedule.accum_iter x world size / 256",
      runtime=True)
def _min_lr_blr(cfg, world):
    if cfg.optim.lr > 0:
        return None
    peak = cfg.optim.blr * cfg.data.batch_size * cfg.schedule.accum_iter * world / 256
    return f"the cosine floor is above the peak lr {peak:g} at world size {world}" if cfg.optim.min_lr > peak else None


def micro_batch_for(per_rank: int, bound: int) -> int:
    """The micro-batch of a per-rank batch under ``data.micro_batch_size`` = ``bound``: ``per_rank`` itself within the
    bound (or with no bound), else its largest divisor <= bound (which the rule below requires to be at least half the
    bound, so that a bad bound does not turn into hundreds of tiny micro-steps)."""
    if bound <= 0 or per_rank <= bound:
        return per_rank
    return max(d for d in range(1, bound + 1) if per_rank % d == 0)


@rule("data.global_batch_size", text="with data.global_batch_size > 0: it divides over the world size",
      runtime=True)
def _global_divides(cfg, world):
    g = cfg.data.global_batch_size
    if g <= 0 or g % world == 0:
        return None
    lo, hi = g // world * world, (g // world + 1) * world
    return (f"{g} samples do not divide over {world} ranks (the world size): run on a number of GPUs that divides "
            f"{g}, or set data.global_batch_size to a multiple of {world} (e.g. {lo or hi} or {hi}; the learning "
            "rate follows it through optim.blr)")


@rule("data.global_batch_size", "data.micro_batch_size",
      text="with data.global_batch_size > 0: the per-rank batch splits into equal micro-steps of at most "
           "data.micro_batch_size and at least half of it", runtime=True)
def _micro_split(cfg, world):
    g, bound = cfg.data.global_batch_size, cfg.data.micro_batch_size
    if g <= 0 or g % world:
        return None
    per_rank = g // world
    micro = micro_batch_for(per_rank, bound)
    if 2 * micro >= bound or micro == per_rank:
        return None
    good = [d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= 2 * bound][-3:]
    return (f"the per-rank batch {per_rank} cannot be split into equal micro-steps between {bound // 2} and "
            f"{bound} (its largest divisor within the bound is {micro}): set data.micro_batch_size to a divisor of "
            f"{per_rank}, e.g. {good}, or change data.global_batch_size or the number of ranks")


# --------------------------------------------------------------------------- running the rules

def _problems(cfg, origins: Dict[str, str], rules: Sequence[Rule], *args) -> List[str]:
    out = []
    for r in rules:
        msg = r.check(cfg, *args)
        if msg:
            where = ", ".join(f"{k}={get(cfg, k)!r} ({origins.get(k, 'default')})" for k in r.keys)
            out.append(f"{where}: {msg}")
    return out


def _raise(problems: List[str]) -> None:
    if problems:
        raise ConfigError(("invalid config value" if len(problems) == 1 else f"{len(problems)} invalid config values")
                          + ":\n  " + "\n  ".join(problems) + "\n(each key is followed by where it was set; see the "
                          "rule table in docs/config.md)")


def selected(key: str, sections: Optional[Sequence[str]]) -> bool:
    """True when dotted ``key`` lies in ``sections`` (section names, top-level keys or dotted keys; None = all)."""
    return sections is None or any(key == s or key.startswith(s + ".") for s in sections)


def _has(cfg, key: str) -> bool:
    obj = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


def applies(r: Rule, cfg, sections: Optional[Sequence[str]] = None) -> bool:
    """A rule applies to a config that has all its keys (a tool's rules only to the tool's config), all of them in
    ``sections`` (a tool reads some sections only; None = all)."""
    return all(_has(cfg, k) and selected(k, sections) for k in r.keys)


def validate(cfg, origins: Optional[Dict[str, str]] = None, sections: Optional[Sequence[str]] = None) -> None:
    """Every load-time rule that applies (:func:`applies`); raises ConfigError naming each broken rule's keys, values
    and files."""
    origins = origins if origins is not None else getattr(cfg, "_origins", {})
    _raise(_problems(cfg, origins, [r for r in RULES if not r.runtime and applies(r, cfg, sections)]))


def validate_runtime(cfg, world_size: int) -> None:
    """The rules that need the world size (at start-up, :func:`usp_scale.config.resolve.resolve_job`)."""
    _raise(_problems(cfg, getattr(cfg, "_origins", {}), [r for r in RULES if r.runtime and applies(r, cfg)],
                     world_size))


def rules_table() -> str:
    """The markdown table of every rule (docs/config.md holds it; a test keeps the two equal)."""
    lines = ["| keys | rule | checked |", "|---|---|---|"]
    for r in RULES:
        lines.append(f"| {', '.join(f'`{k}`' for k in r.keys)} | {r.text} | "
                     f"{'start-up (world size)' if r.runtime else 'config load'} |")
    return "\n".join(lines)
