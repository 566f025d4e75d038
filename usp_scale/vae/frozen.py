"""The frozen diffusers ``AutoencoderKL`` (docs/method.md §2.1, §4.1): load, encode to scaled latents, decode.

:class:`FrozenVAE` is deliberately *not* an ``nn.Module``: it cannot end up in a model's parameters,
an optimizer or a training engine. Its network is always in ``eval()`` and every call runs under
``torch.no_grad()``. Nothing is downloaded: weights come from a local path (see :func:`load_autoencoder`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..checkpoint.safe_load import (CheckpointFileError, UnsafeCheckpointError, check_finite, read_safetensors,
                                     torch_load)
from .named import resolve_vae_path, shipped, shipped_scale
from .latent_norm import LatentNorm, build_latent_norm
from .ldm import LDMLayoutError, ldm_to_diffusers, rename_deprecated_attention, split_autoencoder

# Latent scale per VAE version. f16d32 (VA-VAE) is 1.0: LightningDiT normalises its latents per channel
# ((z - mean) / std, latent_multiplier 1.0) with statistics of the latents themselves, not with one factor.
SCALE = {"d8": 0.18215, "d16": 0.2325, "f16d32": 1.0}
VAE_VERSIONS = tuple(SCALE)  # vae.version's choices
# Latent geometry of each version: (channels, downsampling).
GEOMETRY = {"d8": (4, 8), "d16": (16, 16), "f16d32": (32, 16)}
VERSIONS = "'d8' (SD-VAE), 'd16' (KL-16) or 'f16d32' (VA-VAE)"
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

WHERE = ("Put the weights there: for d8 a diffusers folder with config.json and diffusion_pytorch_model.safetensors "
         "(the files of stabilityai/sd-vae-ft-ema, e.g. `huggingface-cli download stabilityai/sd-vae-ft-ema "
         "--local-dir DIR` on a machine with network), or a single .safetensors/.ckpt file of the same VAE; for d16 "
         "MAR's kl16.ckpt; for f16d32 the VA-VAE .pt (hustvl/vavae-imagenet256-f16d32-dinov2). "
         "Set vae.path=DIR_OR_FILE, or vae.path=tiny-random for a small random VAE (tests/demo). "
         "Nothing is downloaded at run time.")


class VAELoadError(ValueError):
    """A VAE path that cannot be loaded (missing, wrong layout, unsupported architecture)."""


# --------------------------------------------------------------------------- building

RANDOM_PATHS = ("tiny-random", "sd-random")


def _random_vae(version: str, seed: int = 0, full: bool = False):
    """A seeded random AutoencoderKL with the d8 (x8, 4 ch), d16 (x16, 16 ch, attention at the lowest level of the
    encoder) or f16d32 (VA-VAE: x16, 32 ch, attention at the lowest level of encoder and decoder) layout: small
    ("tiny-random", tests and the CPU demo) or the real sizes ("sd-random", for benchmarks)."""
    from diffusers import AutoencoderKL
    up = ("UpDecoderBlock2D",) * 5
    if version == "d8":
        blocks = (128, 256, 512, 512) if full else (32, 32, 64, 64)
        down, latent, up = ("DownEncoderBlock2D",) * 4, 4, up[:4]
    elif version == "d16":
        blocks = (128, 128, 256, 256, 512) if full else (32, 32, 64, 64, 64)
        down, latent = ("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",), 16
    else:
        blocks = (128, 128, 256, 256, 512) if full else (32, 32, 64, 64, 64)
        down, latent = ("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",), 32
        up = ("AttnUpDecoderBlock2D",) + up[1:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=down,
                             up_block_types=up, block_out_channels=blocks,
                             layers_per_block=2 if full else 1, latent_channels=latent, norm_num_groups=32,
                             scaling_factor=SCALE[version])


def _unwrap_state_dict(sd: dict, path: str) -> Dict[str, torch.Tensor]:
    """The autoencoder's tensors of a checkpoint (usp_scale/vae/ldm.py: training-only families dropped by name and
    logged, any other key an error naming the file)."""
    for k in ("state_dict", "model", "vae"):
        if k in sd and isinstance(sd[k], dict) and not torch.is_tensor(sd[k]):
            sd = sd[k]
    try:
        return split_autoencoder({k: v for k, v in sd.items() if torch.is_tensor(v)}, path)[0]
    except LDMLayoutError as e:
        raise VAELoadError(f"{e}. {WHERE}") from e


def _ldm_to_diffusers(sd: Dict[str, torch.Tensor], path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Original LDM/MAR/VA-VAE key layout (encoder.down.i.block.j) -> diffusers layout, plus the inferred config
    (usp_scale/vae/ldm.py)."""
    try:
        new, cfg = ldm_to_diffusers(sd, path)
    except LDMLayoutError as e:
        raise VAELoadError(str(e)) from e
    return new, {k: cfg[k] for k in ("down_block_types", "up_block_types", "block_out_channels",
                                     "layers_per_block", "norm_num_groups", "in_channels", "out_channels")}


def _count(sd, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def _config_from_diffusers_sd(sd: Dict[str, torch.Tensor]) -> dict:
    n = _count(sd, r"encoder\.down_blocks\.(\d+)\.")
    blocks = tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(n))
    layers = _count(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    down = tuple("AttnDownEncoderBlock2D" if any(k.startswith(f"encoder.down_blocks.{i}.attentions.") for k in sd)
                 else "DownEncoderBlock2D" for i in range(n))
    up = tuple("AttnUpDecoderBlock2D" if any(k.startswith(f"decoder.up_blocks.{i}.attentions.") for k in sd)
               else "UpDecoderBlock2D" for i in range(n))
    return {"down_block_types": down, "up_block_types": up, "block_out_channels": blocks,
            "layers_per_block": layers}


def _from_single_file(path: str, version: str):
    from diffusers import AutoencoderKL
    try:
        if path.endswith(".safetensors"):
            raw = read_safetensors(path, what="VAE weights file")
        else:  # weights_only=True with the allowlist: nothing in the file runs
            raw = torch_load(path, what="VAE weights file")
    except UnsafeCheckpointError:
        raise
    except CheckpointFileError as e:
        raise VAELoadError(f"{e}. {WHERE}") from e
    if not isinstance(raw, dict):
        raise VAELoadError(f"VAE weights file {path} holds a {type(raw).__name__}, not a state dict. {WHERE}")
    check_finite(raw, path, what="VAE weights file")
    sd = _unwrap_state_dict(raw, path)
    if any(k.startswith("encoder.down.") for k in sd):
        sd, cfg = _ldm_to_diffusers(sd, path)
    else:
        sd, _ = rename_deprecated_attention(sd)  # diffusers' pre-0.14 names (query/key/value/proj_attn)
        cfg = _config_from_diffusers_sd(sd)
    latent = sd["encoder.conv_out.weight"].shape[0] // 2
    cfg.update(latent_channels=latent, use_quant_conv="quant_conv.weight" in sd,
               use_post_quant_conv="post_quant_conv.weight" in sd,
               mid_block_add_attention=any(k.startswith("encoder.mid_block.attentions.") for k in sd),
               scaling_factor=SCALE[version])
    model = AutoencoderKL(**cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise VAELoadError(f"{path}: weights do not fit the inferred AutoencoderKL {cfg}: missing {missing[:6]} "
                           f"({len(missing)}), unexpected {unexpected[:6]} ({len(unexpected)})")
    return model


def load_autoencoder(path: str, version: str = "d8", seed: int = 0):
    """AutoencoderKL from "tiny-random"/"sd-random" (seeded random weights), a local diffusers folder, or a
    .safetensors/.ckpt/.pt/.pth file."""
    from diffusers import AutoencoderKL
    if version not in SCALE:
        raise VAELoadError(f"vae.version={version!r} is unknown; use {VERSIONS}")
    if path in RANDOM_PATHS:
        return _random_vae(version, seed, full=path == "sd-random")
    path = resolve_vae_path(path)  # a shipped VAE's short name (usp_scale/assets/vae/) -> its folder
    if not path:
        raise VAELoadError(f"vae.path is empty. {WHERE}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise VAELoadError(f"VAE folder {path} has no config.json (expected a diffusers AutoencoderKL folder). "
                               f"{WHERE}")
        if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
            raise VAELoadError(f"VAE folder {path} has config.json but no {' or '.join(WEIGHT_FILES)}. {WHERE}")
        try:
            return AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
        except Exception as e:  # noqa: BLE001
            raise VAELoadError(f"cannot load the diffusers VAE folder {path}: {type(e).__name__}: {e}. {WHERE}") from e
    if os.path.isfile(path):
        if not path.endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin")):
            raise VAELoadError(f"VAE file {path} is not a .safetensors/.ckpt/.pt/.pth/.bin file. {WHERE}")
        return _from_single_file(path, version)
    names = ", ".join(shipped())
    raise VAELoadError(f"VAE path not found: {path}. {WHERE} The VAEs shipped in the package take their short name "
                       f"({names}: usp_scale/assets/vae/, re-made by launchers/train_vae.py).")


def _hash_weights(h, model: torch.nn.Module) -> None:
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 (16 hex) over the state dict's names, shapes and fp32 values."""
    h = hashlib.sha256()
    _hash_weights(h, model)
    return h.hexdigest()[:16]


# AutoencoderKL config keys that shape what the network computes (not sample_size, scaling_factor, force_upcast:
# the latent scale is vae.scale, recorded beside the fingerprint).
ARCH_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "use_quant_conv",
             "use_post_quant_conv", "mid_block_add_attention")


def content_fingerprint(model: torch.nn.Module) -> str:
    """The VAE's identity by content: sha256 (16 hex) over its architecture (:data:`ARCH_KEYS` of the diffusers
    config) and every weight (names, shapes, fp32 values). The same weights give the same fingerprint from a
    diffusers folder, a .safetensors or a .ckpt file, under any folder or file name; call it on the weights as
    loaded (before a cast to bf16/fp16)."""
    config = getattr(model, "config", {})
    arch = {k: list(v) if isinstance(v, tuple) else v for k in ARCH_KEYS for v in [config.get(k)]}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    _hash_weights(h, model)
    return h.hexdigest()[:16]


_CONTENT_CACHE: Dict[tuple, str] = {}


def path_content_fingerprint(path: str, version: str = "d8", seed: int = 0) -> str:
    """:func:`content_fingerprint` of the VAE at ``path`` (loaded on the CPU in fp32); memoised per process for
    unchanged files."""
    if path in RANDOM_PATHS:
        key: tuple = (path, version, seed)
    else:
        files = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
        key = (os.path.abspath(path), version, tuple((f, os.path.getsize(f), os.path.getmtime(f))
                                                      for f in files if os.path.isfile(f)))
    if key not in _CONTENT_CACHE:
        _CONTENT_CACHE[key] = content_fingerprint(load_autoencoder(path, version, seed))
    return _CONTENT_CACHE[key]


# --------------------------------------------------------------------------- the wrapper

class FrozenVAE:
    """Frozen encoder/decoder: images in [-1, 1] <-> scaled latents.

    ``encode`` returns ``scale * (mean or mean + std * eps)``; ``encode_moments`` returns the unscaled
    posterior ``(mean, logvar)`` (logvar as produced, not clamped); ``decode`` maps scaled latents back
    to images in [-1, 1]. Inputs may live on any device and dtype; outputs are fp32 on ``self.device``.
    """

    def __init__(self, path: str = "tiny-random", version: str = "d8", scale: float = 0.0, dtype: str = "fp32",
                 device="cpu", channels_last: bool = True, compile: bool = False, posterior: str = "mean",
                 seed: int = 0, autocast: bool = False, compile_mode: str = "default", latent_stats: str = "",
                 latent_multiplier: float = 1.0):
        if version not in SCALE:
            raise VAELoadError(f"vae.version={version!r} is unknown; use {VERSIONS}")
        if dtype not in DTYPES:
            raise VAELoadError(f"vae.dtype={dtype!r} is unknown; use one of {sorted(DTYPES)}")
        if posterior not in ("mean", "sample"):
            raise VAELoadError(f"vae.posterior={posterior!r} is unknown; use 'mean' or 'sample'")
        self.path, self.version, self.dtype_name = path, version, dtype
        self.scale = float(scale) if scale else (shipped_scale(path) or SCALE[version])
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        self.posterior = posterior
        model = load_autoencoder(path, version, seed)
        # The content fingerprint is of the weights as loaded: take it before a cast to bf16/fp16.
        self._content: Optional[str] = None if self.dtype == torch.float32 else content_fingerprint(model)
        model.requires_grad_(False)
        model.eval()
        # nn.Module.to directly: the whole network in one dtype (diffusers' .to override only adds a warning).
        # Under autocast the weights stay fp32 and autocast picks each op's precision, as in the official code.
        self.weight_dtype = torch.float32 if autocast else self.dtype
        torch.nn.Module.to(model, self.device, self.weight_dtype)
        if channels_last:
            torch.nn.Module.to(model, memory_format=torch.channels_last)
        self.model = model
        self.downsample = 2 ** (len(model.config.block_out_channels) - 1)
        self.latent_channels = int(model.config.latent_channels)
        self._channels_last = channels_last
        self._autocast = autocast and self.dtype != torch.float32
        self._graphs = EncodeGraphs(model, compile=compile, mode=compile_mode)
        self._fingerprint: Optional[str] = None
        # raw latents <-> model space: the scale, or channel statistics (vae.latent_stats; checked against this
        # VAE's channels and content fingerprint when the statistics file records it)
        self.norm: LatentNorm = build_latent_norm(
            self.scale, latent_stats, latent_multiplier, channels=self.latent_channels,
            vae_content=self.content_fingerprint if latent_stats else None)

    @classmethod
    def from_config(cls, cfg, device="cpu") -> "FrozenVAE":
        """From a :class:`~usp_scale.config.schema.VAEConfig`."""
        return cls(path=cfg.path, version=cfg.version, scale=cfg.scale, dtype=cfg.dtype, device=device,
                   channels_last=cfg.channels_last, compile=cfg.compile, posterior=cfg.posterior,
                   autocast=cfg.autocast, compile_mode=cfg.compile_mode, latent_stats=cfg.latent_stats,
                   latent_multiplier=cfg.latent_multiplier)

    # -- info
    def latent_shape(self, image_size: int) -> Tuple[int, int, int]:
        if image_size % self.downsample:
            raise ValueError(f"image size {image_size} is not a multiple of the VAE downsampling {self.downsample}")
        s = image_size // self.downsample
        return (self.latent_channels, s, s)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model)
        return self._fingerprint

    @property
    def content_fingerprint(self) -> str:
        """:func:`content_fingerprint` of the weights as loaded (architecture + fp32 weights)."""
        if self._content is None:
            self._content = content_fingerprint(self.model)
        return self._content

    def identity(self) -> dict:
        """What a latent cache records about the VAE that produced it (``content`` decides; path and name are
        for people)."""
        # the normalisation is not part of it: a cache stores raw moments, the reader applies vae.latent_stats
        return {"version": self.version, "path": self.path, "name": os.path.basename(os.path.normpath(self.path)),
                "scale": self.scale, "dtype": self.dtype_name + ("-autocast" if self._autocast else ""),
                "latent_channels": self.latent_channels,
                "downsample": self.downsample, "fingerprint": self.fingerprint, "content": self.content_fingerprint}

    def train(self, mode: bool = True):
        raise RuntimeError("the VAE is frozen: it always stays in eval() mode and is never trained")

    # -- compute
    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.weight_dtype, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last else x

    def _precision(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self._autocast else contextlib.nullcontext()

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N,3,H,W) in [-1,1] -> mean, logvar, each (N,C,H/ds,W/ds) fp32, unscaled."""
        with self._precision():
            return self._graphs.run("moments", self._prep(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, posterior: Optional[str] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(N,3,H,W) in [-1,1] -> scaled latents (N,C,h,w) fp32 (posterior mean or a sample).

        The mean runs the mean-only graph (:class:`EncodeGraph`, the logvar half of quant_conv is not computed);
        a sample needs both moments."""
        if (posterior or self.posterior) == "sample":
            mean, logvar = self.encode_moments(images)
            return posterior_latents(mean, logvar, self.norm, sample=True, generator=generator)
        with self._precision():
            mean = self._graphs.run("mean", self._prep(images))
        return self.norm.apply(mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents (N,C,h,w) -> images (N,3,H,W) fp32 in [-1, 1] (the inverse of the encoder's
        normalisation, :attr:`norm`)."""
        z = self._prep(self.norm.invert(latents))
        if self.model.post_quant_conv is not None:
            z = self.model.post_quant_conv(z)
        return self.model.decoder(z).float().clamp_(-1, 1)


def posterior_latents(mean: torch.Tensor, logvar: torch.Tensor, scale, sample: bool = True,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """scale * mean, or scale * (mean + exp(0.5*clamp(logvar, -30, 20)) * eps) in fp32; ``scale`` a float or a
    :class:`~usp_scale.vae.latent_norm.LatentNorm` (then its :meth:`~LatentNorm.apply` replaces the factor)."""
    if isinstance(scale, LatentNorm):
        return scale.apply(posterior_latents(mean, logvar, 1.0, sample, generator))
    if not sample:
        return mean.to(torch.float32, copy=True).mul_(scale)
    std = logvar.to(torch.float32, copy=True).clamp_(-30.0, 20.0).mul_(0.5).exp_()
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return eps.mul_(std).add_(mean).mul_(scale)  # (mean + std * eps) * scale, in place


# --------------------------------------------------------------------------- the encode graph (fast path)

class EncodeGraph(nn.Module):
    """encoder -> quant_conv -> fp32 moments, one module so that ``torch.compile`` sees one graph.

    ``what="moments"``: (N,3,H,W) -> (mean, logvar), each (N,C,h,w) fp32 contiguous, exactly the reference
    ``model.encoder`` + ``model.quant_conv`` + ``chunk(2)``. ``what="mean"``: -> mean (N,C,h,w) fp32 only, with a
    quant_conv cut to its first C output channels (the logvar half is never computed); equal to the reference mean.
    Shares the parameters of ``model`` (no copies, except the cut 1x1 quant_conv).
    """

    def __init__(self, model, what: str = "moments"):
        super().__init__()
        if what not in ("moments", "mean"):
            raise ValueError(f"EncodeGraph what={what!r}: use 'moments' or 'mean'")
        self.what, self.encoder = what, model.encoder
        self.channels = int(model.config.latent_channels)
        qc = model.quant_conv
        if qc is not None and what == "mean":
            cut = nn.Conv2d(qc.in_channels, self.channels, 1, bias=qc.bias is not None)
            cut.to(qc.weight.device, qc.weight.dtype).requires_grad_(False)
            with torch.no_grad():
                cut.weight.copy_(qc.weight[: self.channels])
                if qc.bias is not None:
                    cut.bias.copy_(qc.bias[: self.channels])
            qc = cut.to(memory_format=torch.channels_last) if qc.weight.is_contiguous(
                memory_format=torch.channels_last) else cut
        self.quant = qc

    def forward(self, x: torch.Tensor):
        h = self.encoder(x)
        if self.quant is not None:
            h = self.quant(h)
        if self.what == "mean":
            return h[:, : self.channels].float().contiguous()
        mean, logvar = h.float().chunk(2, dim=1)
        return mean.contiguous(), logvar.contiguous()


class EncodeGraphs:
    """The two :class:`EncodeGraph` of one VAE, each compiled on first use when asked (``mode`` is torch.compile's).

    Under ``mode="reduce-overhead"`` (CUDA graphs) a replay overwrites the previous outputs, so outputs are cloned:
    the online loader keeps one batch while it encodes the next.
    """

    def __init__(self, model, compile: bool = False, mode: str = "default"):
        if mode not in COMPILE_MODES:
            raise VAELoadError(f"vae.compile_mode={mode!r} is unknown; use one of {', '.join(COMPILE_MODES)}")
        self.model, self.compile, self.mode = model, compile, mode
        self._fns: Dict[str, object] = {}

    def run(self, what: str, x: torch.Tensor):
        fn = self._fns.get(what)
        if fn is None:
            graph = EncodeGraph(self.model, what)
            fn = torch.compile(graph, mode=None if self.mode == "default" else self.mode) if self.compile else graph
            self._fns[what] = fn
        if self.compile and self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
            out = fn(x)
            return out.clone() if torch.is_tensor(out) else tuple(t.clone() for t in out)
        return fn(x)
