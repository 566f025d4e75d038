"""Typed configuration of a usp_scale job.

Every run is described by one :class:`JobConfig` made of nested section dataclasses.
YAML recipes in ``configs/`` fill them (see :mod:`usp_scale.config.load`), dotted
command-line overrides patch them (``optim.blr=1.5e-4``), and the fully resolved
config is written beside the run's outputs.

Each field's comment is its documentation; ``python launchers/pretrain.py --help-config``
prints them. Values without a sensible default are ``MISSING`` and must be given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
# Sentinel for required values: a field whose value is still MISSING after loading is an error.
MISSING = "???"


@dataclass
class DataConfig:
    # Dataset root: ImageFolder (one folder per class) or a folder of WebDataset .tar shards.
    root: str = ""
    # "folder" (ImageFolder layout), "wds" (WebDataset tar shards), "latents" (a latent cache) or
    # "synthetic" (random latents and labels, no files: throughput benchmarks and smoke tests).
    format: str = "folder"
    # Sub-folder of root holding the split, e.g. "train" or "val" ("" = root itself).
    split: str = "train"
    # Validation split, used by classification tasks for top-1/top-5.
    val_split: str = "val"
    # Image side in pixels (224 for pretraining: 28x28 d8 latents; 256 for DiT/SiT).
    image_size: int = 224
    # Image decoder: "auto" (the torchvision/PIL path, which reproduces the official pixels, except for augmentations
    # where DALI was measured to give the same pixels within usp_scale.data.build.DALI_TOLERANCE: today only "eval",
    # when DALI imports), "dali" (opt-in speed; its pretrain/adm crops differ, see docs/data.md) or "torchvision".
    loader: str = "auto"
    # DALI decode device: "auto" (mixed on GPU, cpu otherwise), "mixed" or "cpu".
    dali_device: str = "auto"
    # Augmentation: "pretrain" (RandomResizedCrop 0.2-1 bicubic + flip), "adm" (ADM center crop + flip), "eval"
    # (resize 256 + center crop 224), "finetune" (timm RRC 0.08-1 + flip + RandAugment rand-m9-mstd0.5-inc1 with fill
    # (124,116,104) + RandomErasing 0.25), "linprobe" (MAE linear-probe crop: one-draw RRC 0.08-1 bicubic + flip),
    # "none".
    augment: str = "pretrain"
    # Lower bound of the RandomResizedCrop scale range.
    crop_scale_min: float = 0.2
    # Per-rank batch per micro-step. With data.global_batch_size > 0 it is derived at start-up (see there) and a
    # different value here is replaced, with a warning.
    batch_size: int = 64
    # Global batch per optimizer step, over all ranks and accumulation micro-steps (the paper's batch: 4096 for
    # pretraining, 256 for DiT/SiT); 0 = off (data.batch_size per rank x schedule.accum_iter x world size). When set,
    # per-rank batch = global / world size (an error when it does not divide), split into
    # schedule.accum_iter micro-steps of data.batch_size, so the optimisation is the same for any number of GPUs.
    global_batch_size: int = 0
    # With data.global_batch_size: the largest per-rank micro-batch (the memory bound); the per-rank batch is split
    # into the fewest equal micro-steps of at most this size. 0 = no bound (one micro-step).
    micro_batch_size: int = 0
    # Data loader worker processes (torchvision path) or DALI threads.
    num_workers: int = 4
    # Latent cache folder (written by launchers/cache_latents.py); used when format == "latents"
    # or when the task reads cached latents.
    latent_cache: str = ""
    # Latent cache: draw a posterior sample from the cached moments (True, the official cached path) or use the
    # mean (False, what the official online path feeds the MAE).
    latent_sample: bool = True
    # Online encoding on a GPU: encode the next batch on a side CUDA stream while the current step runs (the step
    # then waits only for the encoder's own time). No effect on the CPU; the latents are the same either way.
    online_overlap: bool = True
    # Treat a corrupt image as an error instead of skipping and reporting it.
    strict: bool = False
    # Drop the last incomplete batch of each epoch.
    drop_last: bool = True
    # Number of classes (1000 for ImageNet).
    num_classes: int = 1000
    # Latent cache of the validation split for format == "latents" ("" = encode val images online).
    latent_cache_val: str = ""
    # Latent cache integrity: "records" (manifest, header and array checksums when opened, the CRC-32 of every record
    # when first read), "sha256" (also hashes every whole shard when opened), "size" (sizes only: damage of the same
    # size goes unseen) or "none". Every mode stops on non-finite moments, naming the shard and record.
    latent_verify: str = "records"
    # DALI: check each file for a complete JPEG/PNG ending before decoding, skipping and reporting truncated ones.
    dali_precheck: bool = True
    # data.format=synthetic: number of random latent samples per epoch (the validation stream has as many).
    synthetic_samples: int = 1024


@dataclass
class VAEConfig:
    # "d8" (SD-VAE, 4 channels, x8) or "d16" (KL-16, 16 channels, x16).
    version: str = "d8"
    # Local path: a diffusers folder (config.json + weights), a .safetensors/.ckpt file,
    # or "tiny-random" for a small random AutoencoderKL (tests and the CPU demo).
    path: str = "tiny-random"
    # Latent scale factor; 0 means the version's default (0.18215 for d8, 0.2325 for d16).
    scale: float = 0.0
    # "mean" (posterior mean, used by USP pretraining) or "sample" (DiT/SiT finetuning).
    posterior: str = "mean"
    # Encoding precision: "fp32", "bf16" or "fp16".
    dtype: str = "fp32"
    # Keep the VAE weights in fp32 and encode under torch.autocast(vae.dtype), as the official code does (fp16
    # autocast), instead of casting the whole network to vae.dtype (faster).
    autocast: bool = False
    # Use channels_last memory format for the VAE convolutions.
    channels_last: bool = True
    # torch.compile the encode graph (encoder, quant_conv, moments, scale).
    compile: bool = False
    # torch.compile mode of the encode graph: "default", "max-autotune", "max-autotune-no-cudagraphs" or
    # "reduce-overhead" (CUDA graphs).
    compile_mode: str = "default"


@dataclass
class ModelConfig:
    # Registry name, e.g. "vit_large_patch_vae", "DiT-XL/2-VAE-simple", "SiT-B/2".
    name: str = MISSING
    # Latent side (28 for 224 px with the d8 VAE, 32 for 256 px).
    img_size: int = 28
    # Latent channels (4 for d8, 16 for d16).
    in_chans: int = 4
    # Classes for DiT/SiT conditioning and classifier heads.
    num_classes: int = 1000
    # DiT/SiT: predict the variance as well (8 output channels).
    learn_sigma: bool = True
    # DiT/SiT: label dropout probability for classifier-free guidance.
    class_dropout_prob: float = 0.1
    # MAE: normalise the target per patch (norm-pix loss).
    norm_pix_loss: bool = True
    # MAE: normalise the target over the whole image instead of per patch (needs norm_pix_loss).
    norm_image: bool = False
    # Classifier: stochastic depth rate.
    drop_path_rate: float = 0.0
    # Classifier: "avg" (finetune: mean pooling + fc_norm) or "token" (linear probe: cls after norm).
    global_pool: str = "avg"
    # Fast paths: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    kernels: str = "auto"
    # Attention backend, chosen once at start-up: "auto", "sdpa", "flash3", "flash2", "cudnn", "efficient", "math" or
    # "reference" (the explicit softmax).
    attn_backend: str = "auto"


@dataclass
class MaskConfig:
    # Fraction of tokens removed from the encoder input.
    ratio: float = 0.75
    # Pretraining "add_noise": input = sqrt(t) z + sqrt(1-t) eps, t ~ U[0.5, 1).
    add_noise: bool = False


@dataclass
class OptimConfig:
    # "adamw" or "lars" (linear probe).
    name: str = "adamw"
    # Absolute learning rate; 0 means lr = blr * global_batch / 256.
    lr: float = 0.0
    # Base learning rate (per 256 samples).
    blr: float = 1.5e-4
    # Lower bound of the cosine schedule.
    min_lr: float = 0.0
    # Decoupled weight decay (not applied to 1-D parameters, biases and no_weight_decay() names).
    weight_decay: float = 0.05
    # AdamW first-moment coefficient.
    beta1: float = 0.9
    # AdamW second-moment coefficient (0.95 for pretraining, 0.999 for finetuning).
    beta2: float = 0.95
    # AdamW epsilon.
    eps: float = 1e-8
    # Layer-wise lr decay for classifier finetuning (1.0 = off).
    layer_decay: float = 1.0
    # Gradient clipping max-norm (0 = off).
    clip_grad: float = 0.0
    # Use torch's fused AdamW kernel when the device supports it (CUDA and CPU); it also lets a non-finite step be
    # skipped on the device without a host sync.
    fused: bool = True
    # Use apex's fused optimizer when importable (error if asked for and missing).
    apex: bool = False
    # LARS momentum (linear probe).
    momentum: float = 0.9
    # LARS trust coefficient (linear probe).
    trust_coefficient: float = 0.001


@dataclass
class ScheduleConfig:
    # "cosine" (warmup + half-cycle cosine, per iteration) or "constant".
    name: str = "cosine"
    # Training length in epochs (pretraining, classification) ...
    epochs: int = 800
    # ... or in optimizer steps (DiT/SiT); when > 0 it takes precedence over epochs.
    max_steps: int = 0
    # Warmup length in epochs.
    warmup_epochs: float = 40.0
    # Warmup length in steps; when > 0 it takes precedence over warmup_epochs.
    warmup_steps: int = 0
    # Gradient accumulation micro-steps per optimizer step (derived when data.global_batch_size > 0).
    accum_iter: int = 1


@dataclass
class EngineConfig:
    # "local", "ddp", "fsdp2" or "deepspeed".
    name: str = "local"
    # Autocast precision: "official" (the official code's precision of the task: fp16 autocast + GradScaler for
    # pretrain/cls/linprobe, fp32 with TF32 for dit/sit; resolved at start-up), "auto" (bf16 on GPU, fp32 on CPU),
    # "fp32", "bf16" or "fp16" (autocast + GradScaler).
    precision: str = "auto"
    # Allow TF32 matmuls and convolutions on the GPU (set at start-up; engine.precision=official turns it on for
    # dit/sit as the official DiT/SiT code does).
    tf32: bool = False
    # dtype of the gradient reduction (DDP all-reduce, FSDP2 reduce-scatter, DeepSpeed communication_data_type):
    # "fp32" (the official code; torchtitan's FSDP default) or "bf16" (half the bytes, rounded gradients).
    reduce_dtype: str = "fp32"
    # torch.compile the model.
    compile: bool = False
    # Activation checkpointing of transformer blocks.
    activation_checkpointing: bool = False
    # DeepSpeed ZeRO stage (1, 2 or 3).
    zero_stage: int = 2
    # FSDP2: reshard parameters after forward (False gives ZeRO-2-like behaviour).
    reshard_after_forward: bool = True
    # FSDP2: shard parameters within groups of this many ranks (e.g. GPUs per node) and replicate across groups
    # (HSDP); 0 = shard over all ranks.
    fsdp_shard_size: int = 0
    # Replaced by engine.reduce_dtype (kept so that old configs load): true is an error naming the new key.
    ddp_bf16_grads: bool = False
    # User-supplied DeepSpeed JSON, merged over the generated one and checked.
    deepspeed_config: str = ""
    # Distributed backend: "auto" (nccl on GPU, gloo on CPU), "nccl" or "gloo".
    backend: str = "auto"
    # Process-group timeout in minutes for start-up, the first optimizer step (compilation), checkpoints and
    # evaluation.
    timeout_min: int = 30
    # Process-group timeout in seconds once training runs (set after the first optimizer step): a hung or
    # unreachable peer stops every rank within this time; it must exceed the slowest training step.
    # 0 keeps engine.timeout_min throughout.
    train_timeout_s: int = 300
    # What engine.compile compiles: "auto" (the whole model on local/ddp, each block on fsdp2/deepspeed),
    # "model" or "blocks". On an H200, whole-model compile gave MAE-XL 2061 img/s vs 1916 per block.
    compile_scope: str = "auto"
    # FP8 matmuls (torchao float8 training) for the blocks' attention/MLP linears: "off", "tensorwise", "rowwise"
    # or "rowwise_with_gw_hp". Changes the numerics; for Hopper-class GPUs with engine.compile=true.
    fp8: str = "off"


@dataclass
class CheckpointConfig:
    # Save every N optimizer steps (0 = only at the end).
    every_steps: int = 1000
    # Keep the last k step folders (0 = keep all).
    keep_last: int = 3
    # Resume from this step folder, or "auto" for the newest one in the output dir, or "".
    resume: str = "auto"
    # Initialise from a transferred or exported checkpoint (model weights only).
    init_from: str = ""
    # Also export model-only safetensors at the end of training.
    export: bool = True
    # Also write the official-format .pth at the end ({"model"} for MAE, {"model","ema","opt","args"} for DiT/SiT).
    export_official: bool = True
    # Refuse to resume when the saved config differs in these sections/keys (dotted prefixes).
    strict_keys: str = "task,model,engine.name,optim.name"


@dataclass
class EMAConfig:
    # EMA decay (0 = no EMA).
    decay: float = 0.0
    # Also export the EMA weights (when ema.decay > 0) as export/ema.safetensors.
    export_ema: bool = True


@dataclass
class EvalConfig:
    # Run FID every N steps during training (0 = off).
    fid_every: int = 0
    # Samples used for in-training FID.
    fid_samples: int = 1000
    # Reference: a folder / .npz of images or precomputed statistics (.npz with mu, sigma).
    fid_reference: str = ""
    # Feature extractor: "inception-v3-compat" (needs inception_weights) or a registered name.
    feature_extractor: str = "inception-v3-compat"
    # Local path of the Inception weights (weights-inception-2015-12-05-6726825d.pth).
    inception_weights: str = ""
    # Sampler for evaluation: "ddpm", "ddim" (DiT); "sde", "ode" (adaptive dopri5), "heun", "euler" (SiT).
    sampler: str = "ddpm"
    # Sampling steps.
    steps: int = 250
    # Classifier-free guidance scale (1.0 = off).
    cfg_scale: float = 1.0
    # Guidance interval in the model's time units (DiT step index, SiT t in [0, 1]); low > high = always.
    cfg_interval_low: float = 1.0
    # Upper end of the guidance interval (see cfg_interval_low).
    cfg_interval_high: float = 0.0
    # Output channels guided by CFG: 0 = all latent channels, 3 = the official DiT/SiT behaviour.
    cfg_channels: int = 0
    # DDIM stochasticity (sampler "ddim" only; 0 = deterministic).
    ddim_eta: float = 0.0
    # Sampling and feature-extraction batch per rank for in-training FID.
    batch_size: int = 64
    # Sampling precision for in-training FID: "fp32" or "bf16" (autocast).
    precision: str = "fp32"
    # Seed of the in-training FID samples (labels and noise depend only on seed and sample index).
    seed: int = 0
    # Metric records (JSON lines) written by in-training FID, relative to the output dir.
    metrics_file: str = "eval_metrics.jsonl"


@dataclass
class JobConfig:
    # Task: "pretrain", "dit", "sit", "cls" or "linprobe".
    task: str = "pretrain"
    # Output folder for checkpoints, metrics, the resolved config and plots.
    output_dir: str = "runs/default"
    # Global seed; each rank uses seed + rank for its augmentations and masking.
    seed: int = 0
    # Log metrics every N optimizer steps.
    log_every: int = 10
    # Peak dense bf16 FLOP/s of one device, for MFU (989.4e12 on H100/H200 SXM).
    peak_flops: float = 989.4e12
    # Stop after K consecutive non-finite steps (after writing a checkpoint; 0 = no limit).
    max_nonfinite: int = 10
    # Stop (after writing a checkpoint) when more than this fraction of the last nonfinite_window optimizer steps were
    # non-finite (0 = no limit). Every non-finite step is counted in metrics.jsonl and warned about at log steps.
    max_nonfinite_rate: float = 0.05
    # Window (optimizer steps) of max_nonfinite_rate.
    nonfinite_window: int = 1000
    # Show progress bars on rank 0.
    progress: bool = True
    # Label smoothing for classification finetuning.
    smoothing: float = 0.1
    # Mixup alpha for classification finetuning (applied to latents; 0 = off).
    mixup: float = 0.0
    # Cutmix alpha for classification finetuning (applied to latents; 0 = off).
    cutmix: float = 0.0
    # Transfer: number of pretrained blocks to load (-1 = all).
    use_pretrain_layer: int = -1
    # Write TensorBoard events when tensorboard is installed.
    tensorboard: bool = True
    # Write a loss-curve PNG at the end of the run.
    plot: bool = True
    # Evaluate (classification top-1/top-5) every N epochs (0 = only at the end).
    eval_every_epochs: int = 1
    # Stop after this many optimizer steps in this process (0 = no limit); for tests and smoke runs.
    stop_after_steps: int = 0

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


SECTIONS = ("data", "vae", "model", "mask", "optim", "schedule", "engine", "checkpoint", "ema", "eval")
