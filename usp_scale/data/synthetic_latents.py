"""``data.format: synthetic``: random latents and labels, no files and no VAE.

For throughput benchmarks and smoke tests. Sample ``i`` of a stream is a standard-normal latent of the
model's latent shape and a uniform label, both drawn from a generator seeded by (seed, stream, i), so a
sample is the same on every rank, epoch and run. The loader shards and shuffles indices with
:class:`ShardSampler` like the real loaders and follows the same resumable contract
(:mod:`usp_scale.data.loaders`). Not to be confused with :mod:`usp_scale.data.synthetic`, which writes a
small dataset of real JPEG files.

With ``keep_images`` (REPA's online teacher on this format: the REPA run of the golden losses) a batch also carries
``images``: a random picture per sample in [-1, 1] of ``image_size`` px, whole uint8 levels / 127.5 - 1 (what the
project's crops are), drawn from its own stream of (seed, index), so the latents are unchanged by it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .loaders import ResumableLoader
from .sampler import ShardSampler
from .transforms import sample_seed

STREAMS = {"train": 0, "val": 1}
IMAGE_STREAM = 1000   # + the sample's stream: the pictures of keep_images, apart from the latents' draws


def synthetic_sample(seed: int, stream: int, index: int, shape: Sequence[int], num_classes: int):
    """One sample: ``(latent (C,h,w) fp32, label int)``, deterministic per (seed, stream, index)."""
    g = torch.Generator().manual_seed(sample_seed(seed, stream, index))
    z = torch.randn(*shape, generator=g)
    y = int(torch.randint(0, num_classes, (1,), generator=g))
    return z, y


def synthetic_image(seed: int, stream: int, index: int, size: int) -> torch.Tensor:
    """The random picture of a sample (keep_images): (3, size, size) fp32, uint8 levels mapped to [-1, 1]."""
    g = torch.Generator().manual_seed(sample_seed(seed, IMAGE_STREAM + stream, index))
    return torch.randint(0, 256, (3, size, size), generator=g).float() / 127.5 - 1.0


class SyntheticLatentLoader(ResumableLoader):
    """Yields ``{"latents": (N,C,h,w) fp32, "labels": (N,) long, "index": (N,) long}`` on device.

    Drawn samples are kept in host memory up to ``cache_bytes`` (later epochs then cost no generation time);
    beyond it they are drawn again each time, with the same values.
    """

    def __init__(self, sampler: ShardSampler, *, shape: Sequence[int], num_classes: int, stream: int = 0,
                 device="cpu", cache_bytes: int = 1 << 30, image_size: int = 0):
        super().__init__(sampler)
        self.image_size = int(image_size)
        self.keep_images = False   # True: batches also carry a random picture per sample (module docstring)
        if num_classes < 1:
            raise ValueError(f"data.format=synthetic needs num_classes >= 1, got {num_classes}")
        self.shape, self.num_classes, self.stream = tuple(int(s) for s in shape), int(num_classes), int(stream)
        self.device = torch.device(device)
        self._cache: dict = {}
        self._cache_max = cache_bytes // (4 * max(1, torch.Size(self.shape).numel()))

    def _sample(self, i: int):
        hit = self._cache.get(i)
        if hit is None:
            hit = synthetic_sample(self.sampler.seed, self.stream, i, self.shape, self.num_classes)
            if len(self._cache) < self._cache_max:
                self._cache[i] = hit
        return hit

    def _iter_from(self, start: int):
        pin = self.device.type == "cuda"
        for batch in self.sampler.batches(start):
            zs, ys = zip(*(self._sample(i) for i in batch))
            z = torch.stack(zs)  # (N, C, h, w)
            if pin:
                z = z.pin_memory()
            out = {"latents": z.to(self.device, non_blocking=pin),
                   "labels": torch.tensor(ys, dtype=torch.long).to(self.device),
                   "index": torch.tensor(batch, dtype=torch.long).to(self.device)}
            if self.keep_images:
                if self.image_size < 1:
                    raise ValueError("data.format=synthetic: keep_images needs the picture size (data.image_size)")
                out["images"] = torch.stack([synthetic_image(self.sampler.seed, self.stream, i, self.image_size)
                                             for i in batch]).to(self.device)
            yield out


def build_synthetic_loader(data_cfg, shape: Sequence[int], num_classes: int, *, rank: int = 0, world_size: int = 1,
                           seed: int = 0, train: bool = True, device="cpu") -> SyntheticLatentLoader:
    """``data.synthetic_samples`` samples; train: shuffled equal shards, eval: in order, each sample once."""
    n = int(data_cfg.synthetic_samples)
    if n < 1:
        raise ValueError(f"data.format=synthetic needs data.synthetic_samples >= 1, got {n}")
    drop_last = data_cfg.drop_last if train else False
    sampler = ShardSampler(n, rank, world_size, seed, shuffle=train, even=train, batch_size=data_cfg.batch_size,
                           drop_last=drop_last)
    if sampler.num_batches() == 0:
        raise ValueError(f"data.synthetic_samples={n} is smaller than one global batch (data.batch_size="
                         f"{data_cfg.batch_size} x {world_size} ranks): raise data.synthetic_samples")
    return SyntheticLatentLoader(sampler, shape=shape, num_classes=num_classes,
                                 stream=STREAMS["train" if train else "val"], device=device,
                                 image_size=data_cfg.image_size)
