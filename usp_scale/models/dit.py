"""DiT and SiT diffusion transformers (state-dict compatible with the official ``models.py``).

``vae_simple=True`` gives the USP "VAE-simple" variant: the only change is that every block's
``norm1``/``norm2`` LayerNorm is affine again, so the pretrained MAE LayerNorms can be loaded.
SiT is the same network whose ``forward`` drops the learned-sigma half of the output.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ..kernels.dispatch import resolve_impl
from ..layers import fused
from ..layers.attention import Attention
from ..layers.mlp import Mlp
from ..layers.patch import PatchEmbed, unpatchify
from ..layers.pos_embed import fill_sincos_
from .blocks import vit_block_macs
from .contract import CheckpointBlock, LatentTransformer


class TimestepEmbedder(nn.Module):
    """Scalar t -> [cos, sin] of t * exp(-ln(10000) k / half), k < half -> Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; with dropout > 0 a null class (id = num_classes) enables CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids=None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids=None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class DiTBlock(CheckpointBlock):
    """adaLN-Zero block: shift/scale/gate for attention and MLP from SiLU -> Linear(c)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, affine_norm: bool = False,
                 kernels: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=affine_norm, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=affine_norm, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.kernels = kernels

    def block_forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        impl = resolve_impl(self.kernels, x.device, "layernorm_modulate")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = fused.layernorm_modulate(x, self.norm1.weight, self.norm1.bias, shift_msa, scale_msa,
                                     self.norm1.eps, impl=impl)
        x = fused.gated_residual(x, gate_msa, self.attn(h), impl=impl)
        h = fused.layernorm_modulate(x, self.norm2.weight, self.norm2.bias, shift_mlp, scale_mlp,
                                     self.norm2.eps, impl=impl)
        return fused.gated_residual(x, gate_mlp, self.mlp(h), impl=impl)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, kernels: str = "auto"):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        self.kernels = kernels

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        impl = resolve_impl(self.kernels, x.device, "layernorm_modulate")
        return self.linear(fused.layernorm_modulate(x, None, None, shift, scale, self.norm_final.eps, impl=impl))


class DiT(LatentTransformer):
    """Diffusion transformer: latents (N, C, H, W), t (N,), y (N,) -> (N, out_channels, H, W)."""

    stem = ("pos_embed", "x_embedder", "t_embedder", "y_embedder")

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, vae_simple: bool = False, kernels: str = "auto"):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.mlp_ratio = mlp_ratio
        self.vae_simple = vae_simple

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.num_patches = self.x_embedder.num_patches
        # Frozen table: sin-cos at init, or the resampled pretrained table after transfer.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, affine_norm=vae_simple,
                                              kernels=kernels) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, kernels=kernels)
        self.set_kernels(kernels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        for m in self.modules():  # affine LayerNorms (VAE-simple): weight 1, bias 0
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        fill_sincos_(self.pos_embed, self.x_embedder.grid_size)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def no_weight_decay(self) -> set:
        """Official recipe: weight decay 0 for every parameter; nothing beyond ndim <= 1 / bias here."""
        return set()

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward_backbone(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``force_drop_ids`` (N,) 1 = use the null class: the label dropout drawn by the caller (the training
        task, from its generator); None draws it here in training mode, as the official code does."""
        x = self.x_embedder(x) + self.pos_embed       # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)                    # (N, T, p*p*out)
        return self.unpatchify(x)                     # (N, out, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_backbone(x, t, y, force_drop_ids)

    def flops_per_sample(self) -> float:
        """Forward FLOPs of one sample (a DiT sees every token)."""
        T, D = self.num_patches, self.hidden_size
        pc_in = self.patch_size ** 2 * self.in_channels
        macs = T * pc_in * D
        macs += sum(vit_block_macs(D, T, self.mlp_ratio) + 6 * D * D for _ in self.blocks)
        macs += 256 * D + D * D  # timestep MLP
        macs += T * D * self.patch_size ** 2 * self.out_channels + 2 * D * D
        return 2.0 * macs


class SiT(DiT):
    """SiT: the DiT network with a velocity output; the learned-sigma half is computed and dropped."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.forward_backbone(x, t, y, force_drop_ids)
        if self.learn_sigma:
            out, _ = out.chunk(2, dim=1)
        return out
