"""USP's masked autoencoder for LightningDiT: an MAE whose encoder blocks are LightningDiT blocks.

The USP paper reports USP + VA-VAE + LightningDiT but does not publish how it initialised LightningDiT; this
encoder is this project's choice (docs/method.md, LightningDiT section): every encoder block is
:class:`~usp_scale.models.lightningdit.LightningDiTBlock` without its adaLN (``conditioned=False``), i.e. the same
RMSNorm ``norm1``/``norm2``, the same attention (``attn.qkv``/``attn.proj``, optional ``q_norm``/``k_norm``, 2-D RoPE
``feat_rope``) and the same SwiGLU ``mlp.w12``/``mlp.w3``, so the transfer into LightningDiT copies every
transformer weight unchanged (usp_scale/transfer/lightning.py). The stem is LightningDiT's too: patch embedding
(here ``patch_embed``, as USP's MAE names it) and the frozen sin-cos ``pos_embed`` with no class token (LightningDiT
has none). USP's objective is unchanged: random masking by argsort of noise, a 512-wide, 8-deep ViT decoder with
LayerNorm and GELU (discarded at transfer), the masked MSE on the patchified latents (optionally norm-pix).

Shapes for VA-VAE: latents (N, 32, 16, 16) at 256 px (14 x 14 at USP's 224 px pretraining), patch 1 -> L = 256
tokens of 32 values; 75 % masked -> 64 visible tokens, each rotated by the RoPE angles of its grid position.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..kernels.dispatch import resolve_impl
from ..layers import fused
from ..layers.masking import gather_tokens, num_kept, random_masking
from ..layers.patch import PatchEmbed, patchify, unpatchify
from ..layers.pos_embed import fill_sincos_
from ..layers.rope import VisionRotaryEmbedding
from .blocks import Block, init_linear_xavier, vit_block_macs
from .contract import LatentTransformer
from .lightningdit import LightningDiTBlock, lightning_block_macs, norm_layer


class LightningMAE(LatentTransformer):
    stem = ("pos_embed", "mask_token", "patch_embed")

    def __init__(self, img_size: int = 16, patch_size: int = 1, in_chans: int = 32, embed_dim: int = 1152,
                 depth: int = 28, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 norm_image: bool = False, use_qknorm: bool = False, use_swiglu: bool = True, use_rope: bool = True,
                 use_rmsnorm: bool = True, kernels: str = "auto"):
        super().__init__()
        if norm_image and not norm_pix_loss:
            raise ValueError("norm_image=True needs norm_pix_loss=True (the per-image variant of the norm-pix target)")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by {num_heads} heads")
        self.patch_size, self.in_chans, self.embed_dim = patch_size, in_chans, embed_dim
        self.decoder_embed_dim, self.mlp_ratio, self.use_swiglu = decoder_embed_dim, mlp_ratio, use_swiglu
        self.norm_pix_loss, self.norm_image = norm_pix_loss, norm_image

        # ---------------------------------------------------------------- encoder: LightningDiT's stem and blocks
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        L = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, L, embed_dim), requires_grad=False)
        self.feat_rope = (VisionRotaryEmbedding(embed_dim // num_heads, self.patch_embed.grid_size)
                          if use_rope else None)
        self.blocks = nn.ModuleList([
            LightningDiTBlock(embed_dim, num_heads, mlp_ratio, use_qknorm=use_qknorm, use_swiglu=use_swiglu,
                              use_rmsnorm=use_rmsnorm, conditioned=False) for _ in range(depth)])
        self.norm = norm_layer(embed_dim, use_rmsnorm)

        # ---------------------------------------------------------------- decoder: USP's
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.set_kernels(kernels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        grid = self.patch_embed.grid_size
        fill_sincos_(self.pos_embed, grid)
        fill_sincos_(self.decoder_pos_embed, grid)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_xavier)

    def no_weight_decay(self) -> set:
        return set()

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        return patchify(latents, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.in_chans)

    # ------------------------------------------------------------------------ forward
    def forward_encoder(self, latents: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """latents (N, C, H, W) -> encoded visible tokens (N, K, D), mask (N, L; 1 = removed), ids_restore (N, L).
        Each kept token keeps its position: its row of ``pos_embed`` and of the RoPE table."""
        x = self.patch_embed(latents) + self.pos_embed                          # (N, L, D)
        x, mask, ids_restore, ids_keep = random_masking(x, mask_ratio, noise)   # (N, K, D)
        rope = self.feat_rope.tables(ids_keep) if self.feat_rope is not None else None
        for blk in self.blocks:
            x = blk(x, None, rope)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(N, K, D) -> predictions (N, L, p*p*C): mask tokens for the removed positions, original order."""
        x = self.decoder_embed(x)                                               # (N, K, Dd)
        N, K, Dd = x.shape
        L = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(N, L - K, Dd)], dim=1)
        x = gather_tokens(x, ids_restore) + self.decoder_pos_embed              # (N, L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, latents: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return fused.masked_latent_loss(pred, latents, mask, self.patch_size, norm_pix=self.norm_pix_loss,
                                        per_image=self.norm_image,
                                        impl=resolve_impl(self.kernels, pred.device, "masked_latent_loss"))

    def forward(self, latents: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None,
                target: Optional[torch.Tensor] = None):
        """(loss, pred (N, L, p*p*C), mask (N, L)), as USP's MAE; ``target`` defaults to ``latents``."""
        latent, mask, ids_restore = self.forward_encoder(latents, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(latents if target is None else target, pred, mask), pred, mask

    def flops_per_sample(self, mask_ratio: float = 0.75) -> float:
        """Forward FLOPs of one sample: patch embedding of every token, encoder on the kept tokens, decoder on
        all tokens, prediction head."""
        L = self.num_patches
        k = num_kept(L, mask_ratio)
        pc = self.patch_size ** 2 * self.in_chans
        D, Dd = self.embed_dim, self.decoder_embed_dim
        macs = L * pc * D
        macs += sum(lightning_block_macs(D, k, self.mlp_ratio, self.use_swiglu, adaln=0) for _ in self.blocks)
        macs += k * D * Dd
        macs += sum(vit_block_macs(Dd, L, self.mlp_ratio) for _ in self.decoder_blocks)
        macs += L * Dd * pc
        return 2.0 * macs
