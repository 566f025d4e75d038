"""Tiny stand-ins for engine/trainer tests and CPU smoke runs.

Model names starting with ``toy_`` (``toy_mae``, ``toy_dit``, ``toy_cls``) and ``data.root: "toy:N"``
(N random latents, deterministic from the seed) select these instead of the real models and
loaders. They follow the same interfaces: MAE ``forward(latents, mask_ratio, noise) -> (loss,
pred, mask)``, DiT ``forward(x, t, y)``, classifier ``forward(latents) -> logits``, and a loader with
``__len__``, ``set_epoch``, ``state_dict``/``load_state_dict`` yielding ``{"latents", "labels"}``.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn


class ToyBlock(nn.Module):
    """Pre-LN residual MLP over tokens (N, L, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    n, c, h, w = x.shape  # (N, C, H, W) -> (N, L, p*p*C)
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


class ToyMAE(nn.Module):
    def __init__(self, img_size: int = 8, in_chans: int = 4, patch: int = 2, dim: int = 32, depth: int = 2,
                 norm_pix_loss: bool = True, **_):
        super().__init__()
        self.patch, self.norm_pix_loss = patch, norm_pix_loss
        L, pd = (img_size // patch) ** 2, patch * patch * in_chans
        self.patch_embed = nn.Linear(pd, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, L, dim) * 0.02, requires_grad=False)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(ToyBlock(dim) for _ in range(1))
        self.decoder_pred = nn.Linear(dim, pd)

    def no_weight_decay(self):
        return {"cls_token", "pos_embed", "mask_token"}

    def flops_per_sample(self) -> float:
        return 2.0 * sum(p.numel() for p in self.parameters()) * self.pos_embed.shape[1]

    def forward(self, latents, mask_ratio: float = 0.75, noise=None):
        target = _patchify(latents, self.patch)  # (N, L, pd)
        x = self.patch_embed(target) + self.pos_embed
        n, L, d = x.shape
        keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, L, device=x.device)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], 1)
        for b in self.blocks:
            x = b(x)
        x = self.norm(x)[:, 1:]
        x = torch.cat([x, self.mask_token.expand(n, L - keep, -1)], 1)
        x = torch.gather(x, 1, ids_restore[:, :, None].expand(-1, -1, d)) + self.pos_embed
        for b in self.decoder_blocks:
            x = b(x)
        pred = self.decoder_pred(x)
        mask = torch.ones(n, L, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)
        loss = (loss * mask).sum() / mask.sum()
        return loss, pred, mask


class ToyDiT(nn.Module):
    def __init__(self, img_size: int = 8, in_chans: int = 4, dim: int = 32, depth: int = 2, num_classes: int = 10,
                 learn_sigma: bool = True, class_dropout_prob: float = 0.1, **_):
        super().__init__()
        self.in_chans, self.out_chans = in_chans, in_chans * (2 if learn_sigma else 1)
        self.class_dropout_prob, self.num_classes = class_dropout_prob, num_classes
        self.x_embed = nn.Linear(in_chans, dim)
        self.t_embed = nn.Linear(1, dim)
        self.y_embed = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.out = nn.Linear(dim, self.out_chans)

    def no_weight_decay(self):
        return set()

    def flops_per_sample(self) -> float:
        return 2.0 * sum(p.numel() for p in self.parameters())

    def forward(self, x, t, y):
        n, c, h, w = x.shape
        if self.training and self.class_dropout_prob > 0:
            drop = torch.rand(n, device=x.device) < self.class_dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        tok = self.x_embed(x.flatten(2).transpose(1, 2))  # (N, HW, D)
        cond = self.t_embed(t.float().view(n, 1) / 1000.0) + self.y_embed(y)
        tok = tok + cond[:, None]
        for b in self.blocks:
            tok = b(tok)
        return self.out(tok).transpose(1, 2).reshape(n, self.out_chans, h, w)


class ToyClassifier(nn.Module):
    def __init__(self, img_size: int = 8, in_chans: int = 4, patch: int = 2, dim: int = 32, depth: int = 2,
                 num_classes: int = 10, **_):
        super().__init__()
        self.patch = patch
        L = (img_size // patch) ** 2
        self.patch_embed = nn.Linear(patch * patch * in_chans, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, L, dim) * 0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def flops_per_sample(self) -> float:
        return 2.0 * sum(p.numel() for p in self.parameters()) * self.pos_embed.shape[1]

    def param_groups_layer_id(self, name: str) -> int:
        if name.startswith(("patch_embed", "pos_embed", "cls_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def forward_features(self, latents):
        x = self.patch_embed(_patchify(latents, self.patch)) + self.pos_embed
        for b in self.blocks:
            x = b(x)
        return self.fc_norm(x.mean(1))

    def forward(self, latents):
        return self.head(self.forward_features(latents))


TOY_MODELS = {"toy_mae": ToyMAE, "toy_dit": ToyDiT, "toy_cls": ToyClassifier}


def create_toy_model(name: str, **kwargs) -> nn.Module:
    if name not in TOY_MODELS:
        raise KeyError(f"unknown toy model {name!r}; known: {', '.join(TOY_MODELS)}")
    return TOY_MODELS[name](**kwargs)


class ToyLatentLoader:
    """Deterministic random latents; each global batch is split over ranks in rank order.

    Resumable: ``state_dict()`` holds the epoch and how many batches this epoch already yielded.
    """

    def __init__(self, num_samples: int, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shape=(4, 8, 8), num_classes: int = 10, device=torch.device("cpu")):
        g = torch.Generator().manual_seed(1234 + seed)
        self.latents = torch.randn(num_samples, *shape, generator=g)  # (N, C, H, W)
        self.labels = torch.randint(0, num_classes, (num_samples,), generator=g)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device = device
        self.epoch, self.pos = 0, 0
        if len(self) == 0:
            raise ValueError(f"toy dataset of {num_samples} samples is smaller than one global batch "
                             f"({batch_size} x {world_size})")

    def __len__(self) -> int:
        return len(self.latents) // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.pos = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.pos = sd["epoch"], sd["pos"]

    def __iter__(self) -> Iterator[dict]:
        perm = torch.randperm(len(self.latents), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        gb = self.batch_size * self.world_size
        while self.pos < len(self):
            idx = perm[self.pos * gb:(self.pos + 1) * gb][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            self.pos += 1
            yield {"latents": self.latents[idx].to(self.device), "labels": self.labels[idx].to(self.device)}


class ToyDiffusion:
    """Stand-in with the DDPM interface: eps-prediction MSE over uniform integer t."""

    num_timesteps = 1000

    def training_losses(self, model, x0, t, model_kwargs):
        betas = torch.linspace(1e-4, 0.02, self.num_timesteps, dtype=torch.float64)
        abar = torch.cumprod(1 - betas, 0).float().to(x0.device)[t].view(-1, 1, 1, 1)
        eps = torch.randn_like(x0)
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        out = model(xt, t, **model_kwargs)[:, : x0.shape[1]]
        return {"loss": ((out - eps) ** 2).mean(dim=(1, 2, 3))}


class ToyTransport:
    """Stand-in with the SiT transport interface: linear path, velocity target."""

    def training_losses(self, model, x1, model_kwargs):
        t = torch.rand(x1.shape[0], device=x1.device)
        x0 = torch.randn_like(x1)
        tt = t.view(-1, 1, 1, 1)
        xt = tt * x1 + (1 - tt) * x0
        out = model(xt, t * 1000, **model_kwargs)[:, : x1.shape[1]]
        return {"loss": ((out - (x1 - x0)) ** 2).mean(dim=(1, 2, 3))}
