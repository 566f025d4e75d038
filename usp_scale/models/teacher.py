"""REPA's frozen teacher: DINOv2 ViT-B/14 without registers (facebookresearch/dinov2 ``dinov2_vitb14``), the
input REPA feeds it, and the frozen wrapper the training side uses.

The network lives here and computes; it knows nothing of files. Reading the weights (the official torch.hub
``dinov2_vitb14_pretrain.pth`` or timm's ``vit_base_patch14_dinov2``), the key mapping and the position-table
resampling at load are in :mod:`usp_scale.transfer.teachers`, which returns a :class:`FrozenTeacher`.

- :class:`DINOv2ViT`: the architecture of dinov2's ``vit_base`` as torch.hub builds it (``_make_dinov2_model``:
  patch 14, LayerScale, no registers, MLP FFN): patch-embed conv, cls token, learned position table
  (1, 1 + G*G, D) for **one** input grid G (REPA resamples the 37x37 table of the checkpoint to 16x16 once, at
  load, so the forward never interpolates), pre-LN blocks ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``
  (LayerNorm eps 1e-6, qkv bias, exact GELU), a final LayerNorm. Keys: timm's ``vit_base_patch14_dinov2`` (the
  hub's minus ``mask_token``, which only DINOv2's masked-image training reads). The output is REPA's target:
  the **patch tokens after the final norm, without the cls token** (the hub's ``x_norm_patchtokens``), (N, G*G, D).
- :func:`repa_preprocess`: REPA's ``preprocess_raw_image`` for DINOv2 (train.py): raw uint8 pixels / 255, ImageNet
  mean/std, then ``F.interpolate(x, 224 * (resolution // 256), mode="bicubic")`` (align_corners False, no antialias)
  -- 224 at 256 px (16 x 16 = 256 tokens, SiT-XL/2's count), 448 at 512 px (1024 tokens).
- :class:`FrozenTeacher`: network + preprocessing, eval mode, ``requires_grad`` False, run under ``no_grad``. It
  is deliberately **not** an ``nn.Module``: assigned to a model's attribute it does not become a submodule, so it
  can never reach ``model.parameters()``, an optimizer, a checkpoint's state dict or an FSDP/ZeRO wrapper.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.attention import Attention, set_attention_backend
from ..layers.mlp import Mlp
from ..layers.patch import PatchEmbed
from .blocks import vit_block_macs

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # timm IMAGENET_DEFAULT_MEAN / _STD, what REPA normalises with
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TeacherSpec:
    """A DINOv2-style ViT: width, depth, heads, patch; ``z_dim`` = embed_dim is the projector's target width."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    layerscale: bool = True


TEACHERS = {
    # dinov2_vitb14 (no registers): what REPA's --enc-type dinov2-vit-b loads from torch.hub
    "dinov2_vitb14": TeacherSpec(embed_dim=768, depth=12, num_heads=12, patch_size=14),
    # the same architecture at CPU size (tests, tiny runs): 64-wide tokens as the tiny REPA models' projectors
    "dinov2_tiny_test": TeacherSpec(embed_dim=64, depth=2, num_heads=2, patch_size=14),
    # the teacher the project trains and ships itself (usp_scale/assets/teacher/synthetic-vit, launchers/
    # train_teacher.py): DINOv2's architecture at CPU size, trained on the synthetic set's 64 px images
    "synthetic-vit": TeacherSpec(embed_dim=64, depth=3, num_heads=4, patch_size=14),
}

# The teacher's input side for a training image of S px is ``side * (S // per)``. REPA's rule for DINOv2 (and the
# default): 224 per 256 px (256 -> 224, 16 x 16 tokens; 512 -> 448). The shipped synthetic-vit keeps REPA's 7/8
# ratio and patch 14 at the synthetic set's size: 56 per 64 px (64 -> 56, 4 x 4 = 16 tokens, SiT-tiny/2's count on
# the 8 x 8 latents of synthetic-f8).
INPUT_RULES = {"synthetic-vit": (56, 64)}
REPA_RULE = (224, 256)


class LayerScale(nn.Module):
    """x * gamma (per channel); key ``gamma`` as in DINOv2 and timm."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class TeacherBlock(nn.Module):
    """DINOv2's ViT block (inference): x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, layerscale: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.ls1 = LayerScale(dim) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="none")
        self.ls2 = LayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2ViT(nn.Module):
    """images (N, 3, S, S), S = grid * patch, normalised -> final-norm patch tokens (N, grid*grid, embed_dim)."""

    def __init__(self, spec: TeacherSpec, grid: int = 16, attn_backend: str = "sdpa"):
        super().__init__()
        self.spec, self.grid = spec, int(grid)
        d = spec.embed_dim
        self.input_size = self.grid * spec.patch_size
        self.patch_embed = PatchEmbed(self.input_size, spec.patch_size, 3, d, bias=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, d))
        self.blocks = nn.ModuleList([TeacherBlock(d, spec.num_heads, spec.mlp_ratio, spec.layerscale)
                                     for _ in range(spec.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)   # DINOv2's init (the weights are always loaded)
        nn.init.normal_(self.cls_token, std=1e-6)
        set_attention_backend(self, attn_backend)

    def set_attn_backend(self, spec: str) -> int:
        """The attention spec of every attention module (the runtime's, as for the models)."""
        return set_attention_backend(self, spec)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)                                                   # (N, T, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]                                                # patch tokens, no cls

    def flops_per_image(self) -> float:
        """Forward matmul FLOPs of one image (2 per multiply-add; attention scores included)."""
        s, t = self.spec, self.num_tokens
        macs = t * 3 * s.patch_size ** 2 * s.embed_dim                           # patch embedding
        macs += s.depth * vit_block_macs(s.embed_dim, t + 1, s.mlp_ratio)         # blocks on cls + patch tokens
        return 2.0 * macs


def repa_input_size(image_size: int, base: int = 224, per: int = 256) -> int:
    """REPA's teacher input side for a training image of ``image_size`` px: 224 * (image_size // 256) (``base`` and
    ``per`` give another teacher's rule, :data:`INPUT_RULES`)."""
    size = base * (int(image_size) // per)
    if size < 1:
        raise ValueError(f"the teacher's input is {base} * ({image_size} // {per}) = {size} px for a {image_size} px "
                         f"image, which is empty: this resize is defined for images of a multiple of {per} px "
                         f"(REPA's: 256 and 512 px); give the teacher's input size explicitly (a multiple of its "
                         f"patch size)")
    return size


def teacher_input_size(name: str, image_size: int) -> int:
    """The default input side of registered teacher ``name`` for ``image_size`` px images: REPA's 224 * (S // 256)
    for DINOv2, the teacher's own rule where :data:`INPUT_RULES` has one."""
    return repa_input_size(image_size, *INPUT_RULES.get(name, REPA_RULE))


def raw_from_unit_range(images: torch.Tensor) -> torch.Tensor:
    """The project's crops in [-1, 1] (uint8 / 255, then mean 0.5 / std 0.5) -> the raw pixel values 0..255 they
    came from, exactly (rounded; float32). REPA feeds its teacher the raw uint8 image."""
    return ((images.float() + 1.0) * 127.5).round_().clamp_(0.0, 255.0)


def repa_preprocess(raw: torch.Tensor, size: int) -> torch.Tensor:
    """REPA's ``preprocess_raw_image`` (the DINOv2 branch): raw pixels (N, 3, H, W), uint8 or float 0..255 ->
    float32 / 255 -> (x - ImageNet mean) / ImageNet std -> bicubic resize to ``size`` x ``size``
    (``F.interpolate`` defaults: align_corners False, no antialias)."""
    if raw.ndim != 4 or raw.shape[1] != 3:
        raise ValueError(f"teacher input: expected raw images (N, 3, H, W), got shape {tuple(raw.shape)}")
    x = raw.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return F.interpolate(x, size, mode="bicubic")


def check_token_count(teacher_tokens: int, model_tokens: int, *, where: str = "") -> None:
    """REPA aligns token i of the model with token i of the teacher: the counts must be equal."""
    if teacher_tokens != model_tokens:
        raise ValueError(
            f"REPA teacher gives {teacher_tokens} patch tokens per image but the model has {model_tokens} "
            f"{where}: the projector's tokens are aligned one to one with the teacher's. Give the teacher the input "
            f"size whose grid matches the model (REPA: 224 px for 256 px images -> 16 x 16, 448 px for 512 px -> "
            f"32 x 32) or change the model's patch size / latent size")


class FrozenTeacher:
    """A frozen teacher network with its input transform; ``teacher(raw_images) -> (N, T, D)`` patch tokens.

    ``raw_images``: (N, 3, H, W) raw pixels 0..255 (uint8 or float) of the same crop (and flip) the latent came
    from; :func:`raw_from_unit_range` turns the project's [-1, 1] crops into them. The forward runs under
    ``torch.no_grad`` in the caller's autocast (REPA runs it under the training autocast). Not an nn.Module (see
    the module docstring): it never reaches a model's parameters, optimizer, checkpoint or sharding wrapper."""

    def __init__(self, net: DINOv2ViT, *, name: str, image_size: int, source: str = ""):
        net.eval()
        net.requires_grad_(False)
        self.net, self.name, self.image_size, self.source = net, name, int(image_size), source
        self._content: Optional[str] = None

    # -- shape
    @property
    def input_size(self) -> int:
        return self.net.input_size

    @property
    def num_tokens(self) -> int:
        return self.net.num_tokens

    @property
    def dim(self) -> int:
        return self.net.spec.embed_dim

    @property
    def device(self) -> torch.device:
        return self.net.pos_embed.device

    def to(self, device) -> "FrozenTeacher":
        self.net.to(device)
        return self

    def check_tokens(self, model_tokens: int, *, where: str = "") -> None:
        check_token_count(self.num_tokens, model_tokens, where=where)

    def flops_per_image(self) -> float:
        return self.net.flops_per_image()

    # -- identity
    def preprocessing(self) -> dict:
        """What the teacher's input transform is, as recorded in a teacher-feature cache."""
        return {"raw": "uint8 pixels of the crop / 255", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "resize": {"from": self.image_size, "to": self.input_size, "mode": "bicubic",
                           "align_corners": False, "antialias": False},
                "tokens": "final-norm patch tokens, no cls"}

    def content_fingerprint(self) -> str:
        """sha256 (16 hex) over the architecture, the preprocessing and every weight (names, shapes, fp32 values)."""
        if self._content is None:
            h = hashlib.sha256(json.dumps({"spec": asdict(self.net.spec), "grid": self.net.grid,
                                           "preprocessing": self.preprocessing()}, sort_keys=True).encode())
            for k, v in sorted(self.net.state_dict().items()):
                h.update(f"{k}:{tuple(v.shape)}".encode())
                h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._content = h.hexdigest()[:16]
        return self._content

    def identity(self) -> dict:
        return {"name": self.name, "source": self.source, "spec": asdict(self.net.spec), "grid": self.net.grid,
                "tokens": self.num_tokens, "dim": self.dim, "preprocessing": self.preprocessing(),
                "content": self.content_fingerprint()}

    # -- compute
    def _check_frozen(self) -> None:
        if self.net.training or any(p.requires_grad for p in self.net.parameters()):
            raise RuntimeError(f"teacher {self.name}: its network was put back into training mode or made "
                               "trainable; the teacher is frozen (eval mode, requires_grad False)")

    @torch.no_grad()
    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw pixels (N, 3, image_size, image_size) -> patch tokens (N, num_tokens, dim)."""
        self._check_frozen()
        if tuple(raw.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"teacher {self.name} was set up for {self.image_size} px images (resized to "
                             f"{self.input_size} px, {self.num_tokens} tokens); got {tuple(raw.shape[-2:])}")
        return self.net(repa_preprocess(raw.to(self.device), self.input_size))

    def from_unit_range(self, images: torch.Tensor) -> torch.Tensor:
        """The project's [-1, 1] crops (N, 3, H, W) -> patch tokens."""
        return self(raw_from_unit_range(images))


def teacher_shape(name: str, image_size: int) -> Tuple[int, int]:
    """(tokens, dim) of registered teacher ``name`` at its default input size for ``image_size`` px images."""
    if name not in TEACHERS:
        raise KeyError(f"unknown teacher {name!r}; known: {', '.join(sorted(TEACHERS))}")
    spec = TEACHERS[name]
    grid = teacher_input_size(name, image_size) // spec.patch_size
    return grid * grid, spec.embed_dim
