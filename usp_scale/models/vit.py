"""ViT classifier on VAE latents, with timm ``VisionTransformer`` state-dict keys.

- finetuning (``global_pool="avg"``): mean of the patch tokens -> ``fc_norm`` -> ``head``; the
  encoder's final ``norm`` is dropped (timm replaces it by Identity, so it has no keys).
- linear probing (``global_pool="token"``, ``linprobe=True``): the cls token after ``norm`` ->
  ``head = Sequential(BatchNorm1d(affine=False, eps=1e-6), Linear)`` as in MAE's linprobe.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers.patch import PatchEmbed
from ..layers.pos_embed import fill_sincos_
from .blocks import Block, init_linear_xavier, vit_block_macs
from .contract import LatentTransformer


class VisionTransformer(LatentTransformer):
    """``kernels`` is accepted for the shared contract; the classifier has no fused ops."""

    stem = ("cls_token", "pos_embed", "patch_embed")

    def __init__(self, img_size: int = 28, patch_size: int = 2, in_chans: int = 4, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 global_pool: str = "avg", drop_path_rate: float = 0.0, linprobe: bool = False,
                 kernels: str = "auto"):
        super().__init__()
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.mlp_ratio = mlp_ratio
        self.linprobe = linprobe
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, drop_path=dpr[i]) for i in range(depth)])
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        head = nn.Linear(embed_dim, num_classes)
        if linprobe:
            self.head = nn.Sequential(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), head)
        else:
            self.head = head
        self.set_kernels(kernels)
        self._init_weights()

    def _init_weights(self) -> None:
        fill_sincos_(self.pos_embed, self.patch_embed.grid_size, cls_token=True)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_linear_xavier)
        head = self.head[1] if self.linprobe else self.head
        # MAE: trunc_normal std 0.01 for the probe head, 2e-5 for the finetuning head; bias 0.
        nn.init.trunc_normal_(head.weight, std=0.01 if self.linprobe else 2e-5)
        nn.init.zeros_(head.bias)

    def no_weight_decay(self) -> set:
        """MAE finetuning: the position table and the cls token are not decayed either."""
        return {"pos_embed", "cls_token"}

    def forward_features(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(latents)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(latents))

    def flops_per_sample(self) -> float:
        """Forward FLOPs of one sample (the classifier sees every token), the head's included."""
        T = self.patch_embed.num_patches + 1
        pc = self.patch_embed.patch_size ** 2 * self.patch_embed.proj.in_channels
        macs = (T - 1) * pc * self.embed_dim
        macs += sum(vit_block_macs(self.embed_dim, T, self.mlp_ratio) for _ in self.blocks)
        return 2.0 * macs + self.head_flops_per_sample()

    def head_flops_per_sample(self) -> float:
        """Forward FLOPs of the classification head (the linear layer) for one sample."""
        return 2.0 * self.embed_dim * self.num_classes
