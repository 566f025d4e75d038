"""LightningDiT (hustvl/LightningDiT, ``models/lightningdit.py``): DiT with SwiGLU, RMSNorm, 2-D RoPE, optional
QK-norm and shift-free adaLN, trained as a rectified flow on VA-VAE latents; state-dict compatible with the
released checkpoints (docs/method.md, LightningDiT section).

Against DiT (models/dit.py): every block's ``norm1``/``norm2`` and the final ``norm_final`` are RMSNorm with a
weight (``use_rmsnorm``; else DiT's non-affine LayerNorm); the MLP is SwiGLU, ``mlp.w12``/``mlp.w3``
(``use_swiglu``; else DiT's GELU-tanh ``mlp.fc1``/``fc2``); q and k get an optional per-head norm
(``attn.q_norm``/``k_norm``, off by default) and the 2-D rotary embedding ``feat_rope`` (``use_rope``; the fixed
sin-cos ``pos_embed`` is still added at the input); ``wo_shift`` drops the shifts of the adaLN (4 instead of 6
modulation vectors per block). There is no learned sigma: the output has ``in_channels`` channels (velocity).
Initialisation is DiT's (xavier linears, zeroed adaLN and output layer, N(0, 0.02) embedders).

Defaults are the released recipe (configs/lightningdit_xl_vavae_f16d32.yaml): 16x16 latents of 32 channels, SwiGLU,
RoPE, RMSNorm, no QK-norm, with shift. :class:`LightningDiTBlock` with ``conditioned=False`` is the pre-norm
block without adaLN that the USP masked autoencoder for LightningDiT (models/lightning_mae.py) is built from.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..layers.mlp import Mlp
from ..layers.patch import PatchEmbed, unpatchify
from ..layers.pos_embed import fill_sincos_
from ..layers.rmsnorm import RMSNorm
from ..layers.rope import Rope, RoPEAttention, VisionRotaryEmbedding
from ..layers.swiglu import SwiGLUFFN, swiglu_hidden
from .contract import CheckpointBlock, LatentTransformer
from .dit import LabelEmbedder, TimestepEmbedder


def modulate(x: torch.Tensor, shift: Optional[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """x (N, T, D) * (1 + scale) [+ shift], scale/shift (N, D); no shift with ``wo_shift``."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


def norm_layer(dim: int, rmsnorm: bool) -> nn.Module:
    return RMSNorm(dim) if rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def mlp_hidden(dim: int, mlp_ratio: float, swiglu: bool) -> int:
    return swiglu_hidden(dim, mlp_ratio) if swiglu else int(dim * mlp_ratio)


class LightningDiTBlock(CheckpointBlock):
    """x + gate * attn(modulate(norm1(x))), then x + gate * mlp(modulate(norm2(x))), adaLN from c; with
    ``conditioned=False`` the same modules without ``adaLN_modulation``: x + attn(norm1(x)), x + mlp(norm2(x))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, use_qknorm: bool = False,
                 use_swiglu: bool = True, use_rmsnorm: bool = True, wo_shift: bool = False, conditioned: bool = True):
        super().__init__()
        self.norm1 = norm_layer(hidden_size, use_rmsnorm)
        self.attn = RoPEAttention(hidden_size, num_heads, qkv_bias=True, qk_norm=use_qknorm, rmsnorm=use_rmsnorm)
        self.norm2 = norm_layer(hidden_size, use_rmsnorm)
        hidden = mlp_hidden(hidden_size, mlp_ratio, use_swiglu)
        self.mlp = SwiGLUFFN(hidden_size, hidden) if use_swiglu else Mlp(hidden_size, hidden, approximate="tanh")
        self.wo_shift = wo_shift
        self.conditioned = conditioned
        if conditioned:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(),
                                                  nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size))

    def block_forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None,
                      rope: Optional[Rope] = None) -> torch.Tensor:
        if not self.conditioned:
            x = x + self.attn(self.norm1(x), rope=rope)
            return x + self.mlp(self.norm2(x))
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def lightning_block_macs(dim: int, tokens: int, mlp_ratio: float, swiglu: bool, adaln: int = 6) -> float:
    """Multiply-adds of one block for one sample: qkv, proj, attention scores and values, the MLP
    (SwiGLU: dim -> 2 hidden -> dim), and ``adaln`` x dim x dim for the modulation (0 without)."""
    h = mlp_hidden(dim, mlp_ratio, swiglu)
    mlp = tokens * (3 * dim * h if swiglu else 2 * dim * h)
    return float(tokens * 4 * dim * dim + 2 * tokens * tokens * dim + mlp + adaln * dim * dim)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = True):
        super().__init__()
        self.norm_final = norm_layer(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LightningDiT(LatentTransformer):
    """Latents (N, C, H, W), t (N,) in [0, 1] (rectified flow, t = 1 is data), y (N,) -> velocity (N, C, H, W)."""

    stem = ("pos_embed", "x_embedder", "t_embedder", "y_embedder")

    def __init__(self, input_size: int = 16, patch_size: int = 1, in_channels: int = 32, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = False, use_qknorm: bool = False,
                 use_swiglu: bool = True, use_rope: bool = True, use_rmsnorm: bool = True, wo_shift: bool = False,
                 kernels: str = "auto"):
        super().__init__()
        if learn_sigma:
            raise ValueError("LightningDiT has no learned sigma (learn_sigma=False): it predicts the velocity only")
        self.learn_sigma = False
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.num_heads, self.hidden_size = patch_size, num_heads, hidden_size
        self.mlp_ratio, self.use_swiglu, self.use_rope, self.wo_shift = mlp_ratio, use_swiglu, use_rope, wo_shift
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by {num_heads} heads")
        self.feat_rope = (VisionRotaryEmbedding(hidden_size // num_heads, self.x_embedder.grid_size)
                          if use_rope else None)
        self.blocks = nn.ModuleList([
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm=use_qknorm, use_swiglu=use_swiglu,
                              use_rmsnorm=use_rmsnorm, wo_shift=wo_shift) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm=use_rmsnorm)
        self.set_kernels(kernels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        fill_sincos_(self.pos_embed, self.x_embedder.grid_size)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def no_weight_decay(self) -> set:
        """The official recipe trains with weight decay 0; nothing beyond ndim <= 1 / bias here."""
        return set()

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # with patch 1 the unpatchify is a pure permutation, i.e. a view of the final layer's output; a copy keeps
        # the model's output a tensor of its own (FSDP2 warns that an in-place op on a returned view would skip its
        # pre-backward hook)
        return unpatchify(x, self.patch_size, self.out_channels).contiguous()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``force_drop_ids`` (N,) 1 = the null class (label dropout drawn by the caller); None draws it here in
        training mode, as the official code does."""
        x = self.x_embedder(x) + self.pos_embed                                      # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)   # (N, D)
        rope = self.feat_rope.tables() if self.feat_rope is not None else None
        for block in self.blocks:
            x = block(x, c, rope)
        return self.unpatchify(self.final_layer(x, c))                               # (N, C, H, W)

    def flops_per_sample(self) -> float:
        """Forward matmul FLOPs of one sample (every token is seen)."""
        T, D, p2 = self.num_patches, self.hidden_size, self.patch_size ** 2
        macs = T * p2 * self.in_channels * D
        macs += sum(lightning_block_macs(D, T, self.mlp_ratio, self.use_swiglu, 4 if self.wo_shift else 6)
                    for _ in self.blocks)
        macs += 256 * D + D * D                                # timestep MLP
        macs += T * D * p2 * self.out_channels + 2 * D * D     # final layer
        return 2.0 * macs
