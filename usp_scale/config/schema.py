"""Typed configuration of a usp_scale job.

Every run is described by one :class:`JobConfig` made of nested section dataclasses.
YAML recipes in ``configs/`` fill them (see :mod:`usp_scale.config.load`), dotted
command-line overrides patch them (``optim.blr=1.5e-4``), and the fully resolved
config is written beside the run's outputs.

Each field is declared with :func:`opt`: its default, its help text and, for a choice field, the allowed values
(``dataclasses.fields(...)[i].metadata``); ``python launchers/pretrain.py --help-config`` prints them. Values
without a sensible default are ``MISSING`` and must be given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

# Choice lists owned by the module that implements the choice (one home each; docs/architecture.md).
from ..data.build import BACKENDS as DATA_LOADERS
from ..data.cache_reader import VERIFY as LATENT_VERIFY
from ..data.transforms import AUGMENT_NAMES
from ..kernels.dispatch import IMPLS as KERNEL_IMPLS
from ..models.teacher import TEACHERS
from ..runtime.attention import BACKENDS as ATTN_BACKENDS
from ..transport.transport import TIME_SAMPLING
from ..vae.frozen import COMPILE_MODES, VAE_VERSIONS

# Sentinel for required values: a field whose value is still MISSING after loading is an error.
MISSING = "???"
# engine.precision=official: task -> (engine.precision, engine.tf32) of the official code (gradients are reduced in
# fp32 for every task); resolved at start-up (usp_scale.config.resolve).
OFFICIAL_PRECISION = {"pretrain": ("fp16", False), "cls": ("fp16", False), "linprobe": ("fp16", False),
                      "dit": ("fp32", True), "sit": ("fp32", True)}


def opt(default: Any, help: str, choices: Optional[Sequence] = None):
    """A config field: its default, its help (``--help-config`` prints it) and, for a choice field, the allowed
    values (checked by :mod:`usp_scale.config.validate` and listed in the help)."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    root: str = opt("", 'Dataset root: ImageFolder (one folder per class) or a folder of WebDataset .tar shards.')
    format: str = opt("folder", '"folder" (ImageFolder layout), "wds" (WebDataset tar shards), "latents" (a latent '
        'cache) or "synthetic" (random latents and labels, no files: throughput benchmarks and smoke tests).',
        choices=('folder', 'wds', 'latents', 'synthetic'))
    split: str = opt("train", 'Sub-folder of root holding the split, e.g. "train" or "val" ("" = root itself).')
    val_split: str = opt("val", 'Validation split, used by classification tasks for top-1/top-5.')
    image_size: int = opt(224, 'Image side in pixels (224 for pretraining: 28x28 d8 latents; 256 for DiT/SiT).')
    loader: str = opt("auto", 'Image decoder: "auto" (the torchvision/PIL path, which reproduces the official pixels, '
        'except for augmentations where DALI was measured to give the same pixels within '
        'usp_scale.data.build.DALI_TOLERANCE: today only "eval", when DALI imports), "dali" (opt-in speed; its '
        'pretrain/adm crops differ, see docs/data.md), "torchvision" or "gpu" (torchvision\'s GPU JPEG decoder with '
        'the PIL crop parameters; pretrain and eval).',
        choices=DATA_LOADERS)
    dali_device: str = opt("auto", 'DALI decode device: "auto" (mixed on GPU, cpu otherwise), "mixed" or "cpu".',
        choices=('auto', 'mixed', 'cpu'))
    augment: str = opt("pretrain", 'Augmentation: "pretrain" (RandomResizedCrop 0.2-1 bicubic + flip), "adm" (ADM '
        'center crop + flip), "eval" (resize 256 + center crop 224), "finetune" (timm RRC 0.08-1 + flip + RandAugment '
        'rand-m9-mstd0.5-inc1 with fill (124,116,104) + RandomErasing 0.25), "linprobe" (MAE linear-probe crop: '
        'one-draw RRC 0.08-1 bicubic + flip), "none".',
        choices=AUGMENT_NAMES)
    crop_scale_min: float = opt(0.2, 'Lower bound of the RandomResizedCrop scale range.')
    batch_size: int = opt(64, 'Per-rank batch per micro-step. With data.global_batch_size > 0 it is derived at '
        'start-up (see there) and a different value here is replaced, with a warning.')
    global_batch_size: int = opt(0, 'Global batch per optimizer step, over all ranks and accumulation micro-steps (the '
        "paper's batch: 4096 for pretraining, 256 for DiT/SiT); 0 = off (data.batch_size per rank x "
        'schedule.accum_iter x world size). When set, per-rank batch = global / world size (an error when it does not '
        'divide), split into schedule.accum_iter micro-steps of data.batch_size, so the optimisation is the same for '
        'any number of GPUs.')
    micro_batch_size: int = opt(0, 'With data.global_batch_size: the largest per-rank micro-batch (the memory bound); '
        'the per-rank batch is split into the fewest equal micro-steps of at most this size. 0 = no bound (one '
        'micro-step).')
    num_workers: int = opt(4, 'Data loader worker processes (torchvision path) or DALI threads.')
    latent_cache: str = opt("", 'Latent cache folder (written by launchers/cache_latents.py); used when format == '
        '"latents" or when the task reads cached latents.')
    latent_sample: bool = opt(True, 'Latent cache: draw a posterior sample from the cached moments (True, the official '
        'cached path) or use the mean (False, what the official online path feeds the MAE).')
    online_overlap: bool = opt(True, 'Online encoding on a GPU: encode the next batch on a side CUDA stream while the '
        "current step runs (the step then waits only for the encoder's own time). No effect on the CPU; the latents "
        'are the same either way.')
    strict: bool = opt(False, 'Treat a corrupt image as an error instead of skipping and reporting it.')
    drop_last: bool = opt(True, 'Drop the last incomplete batch of each epoch.')
    num_classes: int = opt(1000, 'Number of classes (1000 for ImageNet).')
    latent_cache_val: str = opt("", 'Latent cache of the validation split for format == "latents" ("" = encode val '
        'images online).')
    latent_verify: str = opt("records", 'Latent cache integrity: "records" (manifest, header and array checksums when '
        'opened, the CRC-32 of every record when first read), "sha256" (also hashes every whole shard when opened), '
        '"size" (sizes only: damage of the same size goes unseen) or "none". Every mode stops on non-finite moments, '
        'naming the shard and record.',
        choices=LATENT_VERIFY)
    dali_precheck: bool = opt(True, 'DALI: check each file for a complete JPEG/PNG ending before decoding, skipping '
        'and reporting truncated ones.')
    synthetic_samples: int = opt(1024, 'data.format=synthetic: number of random latent samples per epoch (the '
        'validation stream has as many).')


@dataclass
class VAEConfig:
    version: str = opt("d8", '"d8" (SD-VAE, 4 channels, x8), "d16" (KL-16, 16 channels, x16) or "f16d32" (VA-VAE, '
        '32 channels, x16; needs vae.latent_stats).', choices=VAE_VERSIONS)
    path: str = opt("", 'Local path: a diffusers folder (config.json + weights), a .safetensors/.ckpt file, or the '
        'name of a shipped VAE ("synthetic-f8", trained on the synthetic dataset of launchers/make_synthetic.py: the '
        'useful choice on it; "tiny-random", a seeded random AutoencoderKL, only for tests). No default: a job that '
        'encodes or decodes images must name its VAE.')
    scale: float = opt(0.0, "Latent scale factor; 0 means the version's default (0.18215 for d8, 0.2325 for d16). "
        'Not used with vae.latent_stats (must stay 0 then).')
    latent_stats: str = opt("", 'Channel statistics that normalise the latents as (z - mean) / std * '
        'vae.latent_multiplier (LightningDiT on VA-VAE) instead of the scale factor, in training and in decoding: a '
        'latent cache folder (its latent_stats.json, written by launchers/cache_latents.py), that file, or '
        'LightningDiT\'s latents_stats.pt. "" = the scale factor (SD-VAE). Required for vae.version=f16d32.')
    latent_multiplier: float = opt(1.0, 'With vae.latent_stats: the factor after the channel normalisation '
        "(LightningDiT's latent_multiplier, 1.0 for VA-VAE).")
    posterior: str = opt("mean", '"mean" (posterior mean, used by USP pretraining) or "sample" (DiT/SiT finetuning).',
        choices=('mean', 'sample'))
    dtype: str = opt("fp32", 'Encoding precision: "fp32", "bf16" or "fp16".', choices=('fp32', 'bf16', 'fp16'))
    autocast: bool = opt(False, 'Keep the VAE weights in fp32 and encode under torch.autocast(vae.dtype), as the '
        'official code does (fp16 autocast), instead of casting the whole network to vae.dtype (faster).')
    channels_last: bool = opt(True, 'Use channels_last memory format for the VAE convolutions.')
    compile: bool = opt(False, 'torch.compile the encode graph (encoder, quant_conv, moments, scale).')
    compile_mode: str = opt("default", 'torch.compile mode of the encode graph: "default", "max-autotune", '
        '"max-autotune-no-cudagraphs" or "reduce-overhead" (CUDA graphs).',
        choices=COMPILE_MODES)


@dataclass
class ModelConfig:
    name: str = opt(MISSING, 'Registry name, e.g. "vit_large_patch_vae", "DiT-XL/2-VAE-simple", "SiT-B/2".')
    img_size: int = opt(28, 'Latent side (28 for 224 px with the d8 VAE, 32 for 256 px).')
    in_chans: int = opt(4, 'Latent channels (4 for d8, 16 for d16).')
    num_classes: int = opt(1000, 'Classes for DiT/SiT conditioning and classifier heads.')
    learn_sigma: bool = opt(True, 'DiT/SiT: predict the variance as well (8 output channels).')
    class_dropout_prob: float = opt(0.1, 'DiT/SiT: label dropout probability for classifier-free guidance.')
    norm_pix_loss: bool = opt(True, 'MAE: normalise the target per patch (norm-pix loss).')
    norm_image: bool = opt(False, 'MAE: normalise the target over the whole image instead of per patch (needs '
        'norm_pix_loss).')
    drop_path_rate: float = opt(0.0, 'Classifier: stochastic depth rate.')
    global_pool: str = opt("avg", 'Classifier: "avg" (finetune: mean pooling + fc_norm) or "token" (linear probe: cls '
        'after norm).',
        choices=('avg', 'token'))
    kernels: str = opt("auto", 'Fast paths: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".',
        choices=KERNEL_IMPLS)
    attn_backend: str = opt("auto", 'Attention backend, chosen once at start-up: "auto", "sdpa", "flash3", "flash2", '
        '"cudnn", "efficient", "math" or "reference" (the explicit softmax).',
        choices=ATTN_BACKENDS)


@dataclass
class MaskConfig:
    ratio: float = opt(0.75, 'Fraction of tokens removed from the encoder input.')
    add_noise: bool = opt(False, 'Pretraining "add_noise": input = sqrt(t) z + sqrt(1-t) eps, t ~ U[0.5, 1).')


@dataclass
class OptimConfig:
    name: str = opt("adamw", '"adamw" or "lars" (linear probe).', choices=('adamw', 'lars'))
    lr: float = opt(0.0, 'Absolute learning rate; 0 means lr = blr * global_batch / 256.')
    blr: float = opt(1.5e-4, 'Base learning rate (per 256 samples).')
    min_lr: float = opt(0.0, 'Lower bound of the cosine schedule.')
    weight_decay: float = opt(0.05, 'Decoupled weight decay (not applied to 1-D parameters, biases and '
        'no_weight_decay() names).')
    beta1: float = opt(0.9, 'AdamW first-moment coefficient.')
    beta2: float = opt(0.95, 'AdamW second-moment coefficient (0.95 for pretraining, 0.999 for finetuning).')
    eps: float = opt(1e-8, 'AdamW epsilon.')
    layer_decay: float = opt(1.0, 'Layer-wise lr decay for classifier finetuning (1.0 = off).')
    clip_grad: float = opt(0.0, 'Gradient clipping max-norm (0 = off).')
    fused: bool = opt(True, "Use torch's fused AdamW kernel when the device supports it (CUDA and CPU); it also lets a "
        'non-finite step be skipped on the device without a host sync.')
    apex: bool = opt(False, "Use apex's fused optimizer when importable (error if asked for and missing).")
    momentum: float = opt(0.9, 'LARS momentum (linear probe).')
    trust_coefficient: float = opt(0.001, 'LARS trust coefficient (linear probe).')


@dataclass
class ScheduleConfig:
    name: str = opt("cosine", '"cosine" (warmup + half-cycle cosine, per iteration) or "constant".',
        choices=('cosine', 'constant'))
    epochs: int = opt(800, 'Training length in epochs (pretraining, classification) ...')
    max_steps: int = opt(0, '... or in optimizer steps (DiT/SiT); when > 0 it takes precedence over epochs.')
    warmup_epochs: float = opt(40.0, 'Warmup length in epochs.')
    warmup_steps: int = opt(0, 'Warmup length in steps; when > 0 it takes precedence over warmup_epochs.')
    accum_iter: int = opt(1, 'Gradient accumulation micro-steps per optimizer step (derived when '
        'data.global_batch_size > 0).')


@dataclass
class EngineConfig:
    name: str = opt("local", '"local", "ddp", "fsdp2" or "deepspeed".', choices=('local', 'ddp', 'fsdp2', 'deepspeed'))
    precision: str = opt("auto", 'Autocast precision: "official" (the official code\'s precision of the task: fp16 '
        'autocast + GradScaler for pretrain/cls/linprobe, fp32 with TF32 for dit/sit; resolved at start-up), "auto" '
        '(bf16 on GPU, fp32 on CPU), "fp32", "bf16" or "fp16" (autocast + GradScaler).',
        choices=('official', 'auto', 'fp32', 'bf16', 'fp16'))
    tf32: bool = opt(False, 'Allow TF32 matmuls and convolutions on the GPU (set at start-up; '
        'engine.precision=official turns it on for dit/sit as the official DiT/SiT code does).')
    reduce_dtype: str = opt("fp32", 'dtype of the gradient reduction (DDP all-reduce, FSDP2 reduce-scatter, DeepSpeed '
        'communication_data_type): "fp32" (the official code; torchtitan\'s FSDP default) or "bf16" (half the bytes, '
        'rounded gradients).',
        choices=('fp32', 'bf16'))
    compile: bool = opt(False, 'torch.compile the model.')
    activation_checkpointing: bool = opt(False, 'Activation checkpointing of transformer blocks.')
    zero_stage: int = opt(2, 'DeepSpeed ZeRO stage (1, 2 or 3).', choices=(1, 2, 3))
    reshard_after_forward: bool = opt(True, 'FSDP2: reshard parameters after forward (False gives ZeRO-2-like '
        'behaviour).')
    fsdp_shard_size: int = opt(0, 'FSDP2: shard parameters within groups of this many ranks (e.g. GPUs per node) and '
        'replicate across groups (HSDP); 0 = shard over all ranks.')
    ddp_bf16_grads: bool = opt(False, 'Replaced by engine.reduce_dtype (kept so that old configs load): true is an '
        'error naming the new key.')
    deepspeed_config: str = opt("", 'User-supplied DeepSpeed JSON, merged over the generated one and checked.')
    backend: str = opt("auto", 'Distributed backend: "auto" (nccl on GPU, gloo on CPU), "nccl" or "gloo".',
        choices=('auto', 'nccl', 'gloo'))
    timeout_min: int = opt(30, 'Process-group timeout in minutes for start-up, the first optimizer step (compilation), '
        'checkpoints and evaluation.')
    train_timeout_s: int = opt(300, 'Process-group timeout in seconds once training runs (set after the first '
        'optimizer step): a hung or unreachable peer stops every rank within this time; it must exceed the slowest '
        'training step. 0 keeps engine.timeout_min throughout.')
    startup_timeout_s: int = opt(120, 'How long the ranks wait for each other at start-up (the start-up agreement '
        'of usp_scale.runtime: every rank present, none failed, the same resolved config); a missing or failing '
        'rank is then named instead of waiting engine.timeout_min.')
    compile_scope: str = opt("auto", 'What engine.compile compiles: "auto" (the whole model on local/ddp, each block '
        'on fsdp2/deepspeed), "model" or "blocks" (the two measured against each other: '
        'benchmarks/reports/train_step_h200_2026-11-26.md).',
        choices=('auto', 'model', 'blocks'))
    fp8: str = opt("off", 'FP8 matmuls (torchao float8 training) for the blocks\' attention/MLP linears: "off", '
        '"tensorwise", "rowwise" or "rowwise_with_gw_hp". Changes the numerics; for Hopper-class GPUs with '
        'engine.compile=true.',
        choices=('off', 'tensorwise', 'rowwise', 'rowwise_with_gw_hp'))


@dataclass
class CheckpointConfig:
    every_steps: int = opt(1000, 'Save every N optimizer steps (0 = only at the end).')
    keep_last: int = opt(3, 'Keep the last k step folders (0 = keep all).')
    resume: str = opt("auto", 'Resume from this step folder, or the newest complete step of this run folder (or its '
        'checkpoints/ folder), or "auto" for the newest one in the output dir, or "" (start fresh).')
    init_from: str = opt("", 'Initialise from a transferred or exported checkpoint (model weights only).')
    export: bool = opt(True, 'Also export model-only safetensors at the end of training.')
    export_official: bool = opt(True, 'Also write the official-format .pth at the end ({"model"} for MAE, '
        '{"model","ema","opt","args"} for DiT/SiT).')
    strict_keys: str = opt("task,model,engine.name,optim.name", 'Refuse to resume when the saved config differs in '
        'these sections/keys (dotted prefixes).')


@dataclass
class EMAConfig:
    decay: float = opt(0.0, 'EMA decay (0 = no EMA).')
    export_ema: bool = opt(True, 'Also export the EMA weights (when ema.decay > 0) as export/ema.safetensors.')


@dataclass
class EvalConfig:
    fid_every: int = opt(0, 'Run FID every N steps during training (0 = off).')
    fid_samples: int = opt(1000, 'Samples used for in-training FID.')
    fid_reference: str = opt("", 'Reference: a folder / .npz of images or precomputed statistics (.npz with mu, '
        'sigma).')
    feature_extractor: str = opt("inception-v3-compat", 'Feature extractor: "inception-v3-compat" (needs '
        'inception_weights; real data), "usp-synthetic" (trained on the synthetic dataset: the useful choice there) '
        'or another registered name ("usp-tiny" is a random net for tests; its FID says nothing).')
    inception_weights: str = opt("", 'Local path of the Inception network: the ADM evaluator\'s graph '
        'classify_image_graph_def.pb (converted on load), its conversion, or torch-fidelity\'s '
        'weights-inception-2015-12-05-6726825d.pth (read with weights_only; a hash in the name must match).')
    protocol: str = opt("auto", 'Metric protocol of in-training FID: "adm" (the ADM evaluator\'s, which papers '
        'report; the ImageNet recipes), "torch-fidelity", or "auto" (adm for the Inception network against an '
        'ADM-format reference .npz with mu_s/sigma_s, torch-fidelity otherwise). See docs/sampling.md.',
        choices=('auto', 'adm', 'torch-fidelity'))
    sampler: str = opt("auto", 'Sampler: "auto" (ddpm for DiT, sde for SiT), "ddpm", "ddim" (DiT); "sde", "ode" '
        '(adaptive dopri5), "heun", "euler" (SiT).',
        choices=('auto', 'ddpm', 'ddim', 'sde', 'ode', 'heun', 'euler'))
    steps: int = opt(250, 'Sampling steps.')
    cfg_scale: float = opt(1.0, 'Classifier-free guidance scale (1.0 = off).')
    cfg_interval_low: float = opt(1.0, "Guidance interval in the model's time units (DiT step index, SiT t in [0, 1]); "
        'low > high = always.')
    cfg_interval_high: float = opt(0.0, 'Upper end of the guidance interval (see cfg_interval_low).')
    cfg_channels: int = opt(0, 'Output channels guided by CFG: 0 = all latent channels, 3 = the official DiT/SiT '
        'behaviour.')
    ddim_eta: float = opt(0.0, 'DDIM stochasticity (sampler "ddim" only; 0 = deterministic).')
    timestep_shift: float = opt(0.0, 'Samplers heun/euler: move the time grid to s t / (1 + (s - 1) t) '
        "(LightningDiT's timestep shift, 0.3 in its recipe); 0 = the uniform grid.")
    batch_size: int = opt(64, 'Sampling and feature-extraction batch per rank for in-training FID.')
    precision: str = opt("fp32", 'Sampling precision for in-training FID: "fp32" or "bf16" (autocast).',
        choices=('fp32', 'bf16'))
    seed: int = opt(0, 'Seed of the in-training FID samples (labels and noise depend only on seed and sample index).')
    metrics_file: str = opt("eval_metrics.jsonl", 'Metric records (JSON lines) written by in-training FID, relative to '
        'the output dir.')


@dataclass
class ClsConfig:
    """Fields only the classification tasks read (``task=cls``; ``linprobe`` reads ``smoothing``)."""

    smoothing: float = opt(0.1, 'Label smoothing of the classification loss.')
    mixup: float = opt(0.0, 'Mixup alpha for classification finetuning (applied to latents; 0 = off).')
    cutmix: float = opt(0.0, 'Cutmix alpha for classification finetuning (applied to latents; 0 = off).')


@dataclass
class DiTConfig:
    """Fields only the generative tasks read (``task=dit`` and ``task=sit``)."""

    use_pretrain_layer: int = opt(-1, 'Transfer from an MAE checkpoint (checkpoint.init_from): number of pretrained '
                                      'blocks to load (-1 = all).')
    # LightningDiT's flow-matching options (task=sit; docs/method.md §10)
    time_sampling: str = opt("uniform", 'task=sit: training times "uniform" on [0, 1) (SiT) or "logit_normal" '
        "(sigmoid of N(0, 1), LightningDiT's use_lognorm).", choices=TIME_SAMPLING)
    cosine_loss: bool = opt(False, "task=sit: add 1 - cos(v, u) over the channels to the MSE (LightningDiT's "
        'use_cosine_loss).')


@dataclass
class REPAConfig:
    """REPA (representation alignment, docs/method.md §9): read by ``task=dit`` and ``task=sit`` with a ``*-REPA``
    model (usp_scale/training/repa.py)."""

    enabled: bool = opt(False, 'Train with REPA\'s alignment loss: model.name is a *-REPA model (SiT-*/2-REPA, REPA\'s '
        'SiT in its time convention; SiT-*/2-VAE-simple-REPA for USP + REPA; DiT-*/2-VAE-simple-REPA, ours) and the '
        'loss is the diffusion loss + repa.proj_coeff x the projection loss on the teacher\'s tokens of the same crop.')
    encoder_depth: int = opt(8, 'The projector reads the hidden state after this block (1-indexed; REPA: 8 for '
        'SiT-L/XL, 4 common for B); 1..model depth.')
    proj_coeff: float = opt(0.5, 'Weight of the projection (alignment) loss in the total loss (REPA: 0.5).')
    teacher: str = opt("dinov2_vitb14", 'Teacher architecture: "dinov2_vitb14" (DINOv2 ViT-B/14 without registers, '
        'REPA\'s), "synthetic-vit" (the small DINOv2-shaped ViT the project trains on the synthetic set and ships, '
        'repa.teacher_path=synthetic-vit) or "dinov2_tiny_test" (a 2-block, 64-wide DINOv2-shaped ViT for tests).',
        choices=tuple(TEACHERS))
    teacher_path: str = opt("", 'Local teacher weights: the official torch.hub dinov2_vitb14_pretrain.pth or timm\'s '
        'vit_base_patch14_dinov2 model.safetensors (nothing is downloaded), or the name of a shipped teacher '
        '("synthetic-vit", with repa.teacher=synthetic-vit). Read with features=online to run the teacher and with '
        'features=cache to check that the cache holds this teacher\'s tokens.')
    teacher_input_size: int = opt(0, 'Teacher input side in pixels; 0 = the teacher\'s rule: REPA\'s 224 x '
        '(data.image_size // 256) for DINOv2 (224 at 256 px, 16x16 tokens; 448 at 512 px), 56 x (data.image_size // '
        '64) for synthetic-vit (56 at 64 px, 4x4 tokens). The teacher\'s token grid must equal the model\'s.')
    projector_dim: int = opt(2048, 'Hidden width of the projector MLP (REPA: 2048).')
    features: str = opt("cache", 'Where the teacher tokens come from: "cache" (a teacher-feature cache written '
        'beside the latent cache, repa.teacher_cache; data.format=latents) or "online" (the teacher runs on each '
        'batch\'s pixel crops; data.format folder or wds).', choices=("cache", "online"))
    teacher_cache: str = opt("", 'Teacher-feature cache folder (usp_scale.data.teacher_cache) written beside '
        'data.latent_cache from the same crops; used with repa.features=cache.')


@dataclass
class JobConfig:
    task: str = opt("pretrain", 'Task: "pretrain", "dit", "sit", "cls" or "linprobe".',
        choices=('pretrain', 'dit', 'sit', 'cls', 'linprobe'))
    output_dir: str = opt("runs/default", 'Output folder for checkpoints, metrics, the resolved config and plots.')
    seed: int = opt(0, 'Global seed; each rank uses seed + rank for its augmentations and masking.')
    log_every: int = opt(10, 'Log metrics every N optimizer steps.')
    peak_flops: float = opt(989.4e12, 'Peak dense bf16 FLOP/s of one device, for MFU (989.4e12 on H100/H200 SXM).')
    max_nonfinite: int = opt(10, 'Stop after K consecutive non-finite steps (after writing a checkpoint; 0 = no '
        'limit).')
    max_nonfinite_rate: float = opt(0.05, 'Stop (after writing a checkpoint) when more than this fraction of the last '
        'nonfinite_window optimizer steps were non-finite (0 = no limit). Every non-finite step is counted in '
        'metrics.jsonl and warned about at log steps.')
    nonfinite_window: int = opt(1000, 'Window (optimizer steps) of max_nonfinite_rate.')
    progress: bool = opt(True, 'Show progress bars on rank 0.')
    tensorboard: bool = opt(True, 'Write TensorBoard events under OUTPUT/tb (needs tensorboard: the extra "log", in '
        '"all"; warns once when it is missing).')
    plot: bool = opt(True, 'Write a loss-curve PNG at the end of the run.')
    eval_every_epochs: int = opt(1, 'Evaluate (classification top-1/top-5) every N epochs (0 = only at the end).')
    stop_after_steps: int = opt(0, 'Stop after this many optimizer steps in this process (0 = no limit); for tests and '
        'smoke runs.')

    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cls: ClsConfig = field(default_factory=ClsConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    repa: REPAConfig = field(default_factory=REPAConfig)



# --------------------------------------------------------------------------- the tool launchers' own sections
# A tool's config is JobConfig plus its own section (docs/architecture.md, "Configuration"); it reads only some
# sections (usp_scale.config.cli), so a finetuning recipe configures sampling and transfer of its model too.

@dataclass
class SampleConfig:
    """launchers/sample.py: what is sampled from and written (the sampler, guidance, batch, precision and seed are
    the eval section's, the in-training FID's settings)."""

    ckpt: str = opt(MISSING, 'Weights to sample: model-only .safetensors, or a .pt/.pth holding a state dict or the '
        "official {'model', 'ema', ...} dict.")
    weights: str = opt("auto", 'Weights of an official {"model", "ema"} checkpoint: "auto" (the EMA when present), '
        '"ema" or "model".', choices=('auto', 'ema', 'model'))
    model_kwargs: str = opt("{}", 'Extra JSON keyword arguments for create_model, over those of the model section.')
    out_dir: str = opt(MISSING, 'Output folder for {index:06d}.png, the ADM .npz, grid.png and sampling.json.')
    num_samples: int = opt(50000, 'Number of images (sample indices 0..N-1).')
    labels: str = opt("random", 'Class labels: "random" (uniform per index, the official) or "balanced" (index % '
        'model.num_classes).', choices=('random', 'balanced'))
    npz: bool = opt(True, 'Assemble the ADM .npz at the end.')
    grid: int = opt(64, 'Images in grid.png (0 = no grid).')
    max_batches: int = opt(0, 'Stop each process after this many batches (time-limited jobs; rerun to continue; 0 = '
        'no limit).')
    atol: float = opt(1e-6, 'dopri5 absolute tolerance (eval.sampler=ode).')
    rtol: float = opt(1e-3, 'dopri5 relative tolerance (eval.sampler=ode).')
    sde_last_step: float = opt(0.04, 'Size of the final deterministic SDE step (eval.sampler=sde).')
    device: str = opt("auto", 'Device: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu" or "cuda:N".')


@dataclass
class SampleJob(JobConfig):
    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass
class CacheConfig:
    """launchers/cache_latents.py: the latent cache it writes (what it encodes is the data section, with which VAE
    the vae section)."""

    out: str = opt(MISSING, 'Output cache folder.')
    views: int = opt(1, 'Augmented views per image, each stored plain and flipped.')
    dtype: str = opt("fp16", 'Storage dtype of the posterior moments.', choices=('fp16', 'bf16'))
    shard_size: int = opt(1000, 'Source images per shard.')
    batch_size: int = opt(64, 'Images per VAE call.')
    loader: str = opt("torchvision", 'Decoder: "torchvision" (PIL, reproduces the paper resampling) or "dali" '
        '(ImageFolder only; decodes on the GPU when the VAE runs on one).', choices=('torchvision', 'dali'))
    device: str = opt("auto", 'Device: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu" or "cuda:N".')
    stop_after_shards: int = opt(0, 'Testing: stop this rank after writing N shards, as a crash would (0 = off).')
    stats_samples: int = opt(10000, 'Channel statistics (latent_stats.json, for vae.latent_stats) estimated in fp64 '
        "from this many random stored latents drawn with the job's seed (LightningDiT's 10,000); 0 = every latent of "
        'the cache.')


@dataclass
class CacheJob(JobConfig):
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class TransferConfig:
    """launchers/transfer.py: the pretrained MAE read and the transferred model written (the target is the model
    section: the model a finetuning recipe trains; dit.use_pretrain_layer limits the blocks)."""

    src: str = opt(MISSING, "Pretrained MAE checkpoint: official {'model': ...} .pth, a bare state dict, or this "
        "project's .safetensors export.")
    out: str = opt(MISSING, 'Output .safetensors of the transferred model (+ <out>.report.json).')
    which: str = opt("model", 'Which weights of a multi-weight checkpoint to read.', choices=('model', 'ema', 'auto'))
    skip_patch_embed: bool = opt(False, 'Leave the patch embedding at its init when channel counts or patch sizes '
        'differ (otherwise such a mismatch is an error).')


@dataclass
class TransferJob(JobConfig):
    transfer: TransferConfig = field(default_factory=TransferConfig)
