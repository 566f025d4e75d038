"""Masked autoencoder on VAE latents (USP pretraining), state-dict compatible with the official
``models_mae.MaskedAutoencoderViT``.

Shapes for the documented XL recipe: latents (N, 4, 28, 28), patch 2 -> L = 196 tokens of
p*p*C = 16 values; 75 % masked -> 49 visible tokens + cls in the encoder; the decoder is
512 wide, 8 deep, 16 heads, on 1 + 196 tokens.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..kernels.dispatch import resolve_impl
from ..layers import fused
from ..layers.masking import draw_mask, gather_tokens, num_kept
from ..layers.patch import PatchEmbed, patchify, unpatchify
from ..layers.pos_embed import fill_sincos_
from .blocks import Block, init_linear_xavier, vit_block_macs
from .contract import LatentTransformer


class MaskedAutoencoderViT(LatentTransformer):
    stem = ("cls_token", "pos_embed", "mask_token", "patch_embed")

    def __init__(self, img_size: int = 28, patch_size: int = 2, in_chans: int = 4, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 norm_image: bool = False, kernels: str = "auto"):
        super().__init__()
        if norm_image and not norm_pix_loss:
            raise ValueError("norm_image=True needs norm_pix_loss=True (the per-image variant of the norm-pix target)")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.decoder_embed_dim = decoder_embed_dim
        self.mlp_ratio = mlp_ratio
        self.norm_pix_loss = norm_pix_loss
        self.norm_image = norm_image
        self.set_kernels(kernels)

        # ---------------------------------------------------------------- encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        # ---------------------------------------------------------------- decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)

        self.initialize_weights()

    # ------------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        grid = self.patch_embed.grid_size
        fill_sincos_(self.pos_embed, grid, cls_token=True)
        fill_sincos_(self.decoder_pos_embed, grid, cls_token=True)
        # Patch-embed conv: xavier on its (D, C*p*p) view; the bias keeps PyTorch's default init.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_xavier)

    def no_weight_decay(self) -> set:
        """Official recipe: nothing beyond ndim <= 1 / bias (cls and mask tokens ARE decayed)."""
        return set()

    # ------------------------------------------------------------------------ helpers
    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        return patchify(latents, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.in_chans)

    def _impl(self, x: torch.Tensor, op: str) -> str:
        return resolve_impl(self.kernels, x.device, op)

    # ------------------------------------------------------------------------ forward
    def forward_encoder(self, latents: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """latents (N, C, H, W) -> encoded (N, 1 + K, D), mask (N, L), ids_restore (N, L)."""
        N = latents.shape[0]
        ids_keep, ids_restore, mask = draw_mask(N, self.num_patches, mask_ratio, noise, latents.device)
        impl = self._impl(latents, "embed_visible_patches")
        if impl == "torch":
            # Official order: embed every patch, add positions, then drop the masked tokens.
            x = gather_tokens(self.patch_embed(latents) + self.pos_embed[:, 1:, :], ids_keep)   # (N, K, D)
        else:
            x = fused.embed_visible_patches(latents, self.patch_embed.proj.weight, self.patch_embed.proj.bias,
                                            self.pos_embed[:, 1:, :], ids_keep, self.patch_size, impl=impl)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(N, -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)                              # (N, 1 + K, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(N, 1 + K, D) -> predictions (N, L, p*p*C) for every token (cls dropped)."""
        x = self.decoder_embed(x)                                               # (N, 1 + K, Dd)
        x = fused.unshuffle(x, self.mask_token, ids_restore, self.decoder_pos_embed,
                            impl=self._impl(x, "unshuffle"))
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))                             # (N, 1 + L, p*p*C)
        return x[:, 1:, :]

    def forward_loss(self, latents: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Norm-pix MSE on the (h, w, p, q, c)-patchified latent, averaged over removed tokens."""
        return fused.masked_latent_loss(pred, latents, mask, self.patch_size, norm_pix=self.norm_pix_loss,
                                        per_image=self.norm_image, impl=self._impl(pred, "masked_latent_loss"))

    def forward(self, latents: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None,
                target: Optional[torch.Tensor] = None):
        """Returns (loss, pred (N, L, p*p*C), mask (N, L) with 1 = removed). ``target`` (N, C, H, W): what the loss
        reconstructs, default ``latents`` (pretraining with noised inputs passes the clean latents)."""
        latent, mask, ids_restore = self.forward_encoder(latents, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(latents if target is None else target, pred, mask)
        return loss, pred, mask

    # ------------------------------------------------------------------------ accounting
    def flops_per_sample(self, mask_ratio: float = 0.75) -> float:
        """Forward FLOPs (2 per multiply-add) of one sample: patch embed, encoder on the visible tokens,
        decoder on all tokens, prediction head."""
        L = self.num_patches
        k = num_kept(L, mask_ratio)
        pc = self.patch_size ** 2 * self.in_chans
        D, Dd = self.embed_dim, self.decoder_embed_dim
        macs = L * pc * D  # the reference path embeds every patch
        macs += sum(vit_block_macs(D, k + 1, self.mlp_ratio) for _ in self.blocks)
        macs += (k + 1) * D * Dd
        macs += sum(vit_block_macs(Dd, L + 1, self.mlp_ratio) for _ in self.decoder_blocks)
        macs += (L + 1) * Dd * pc
        return 2.0 * macs
