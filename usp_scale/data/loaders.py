"""Resumable batch loaders: the torchvision/PIL image loader and the online (image -> VAE) latent loader.

Every loader follows one contract:
  ``iter(loader)`` yields dicts of tensors for the rest of the current epoch, ``len(loader)`` is the
  number of batches per epoch on this rank, ``set_epoch(e)`` starts epoch e (a no-op when e is the
  current epoch, so a resumed position is kept), and ``state_dict()``/``load_state_dict()`` hold
  ``{"epoch", "position"}`` (batches already yielded in the epoch) so a resumed run continues with the
  identical next batch. A new iterator continues from the position; iterating a finished epoch again
  starts it over, except right after ``load_state_dict`` of a finished epoch, which yields nothing.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, Dict, List

import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import ImageDataset
from .sampler import ShardSampler
from .transforms import sample_seed, seeded

log = logging.getLogger(__name__)


class ResumableLoader:
    """Epoch/position bookkeeping shared by all loaders; subclasses implement ``_iter_from(start)``."""

    def __init__(self, sampler: ShardSampler):
        self.sampler = sampler
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.sampler.num_batches()

    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch, self.position, self._restored = epoch, 0, False
        self.sampler.set_epoch(self.epoch)

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "rank": self.sampler.rank,
                "world_size": self.sampler.world_size, "seed": self.sampler.seed}

    def load_state_dict(self, sd: Dict[str, int]) -> None:
        for k in ("world_size", "seed"):
            if k in sd and sd[k] != getattr(self.sampler, k):
                raise ValueError(f"loader state was saved with {k}={sd[k]} but this loader has "
                                 f"{k}={getattr(self.sampler, k)}; the position cannot be restored exactly")
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])
        self.sampler.set_epoch(self.epoch)
        self._restored = True

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        restored, self._restored = getattr(self, "_restored", False), False
        if self.position >= len(self):
            if restored:
                return  # state saved after the epoch's last batch: the epoch is finished (call set_epoch(e + 1))
            self.position = 0  # iterating a finished epoch again starts it over
        for batch in self._iter_from(self.position):
            self.position += 1
            if batch is not None:
                yield batch

    def _iter_from(self, start: int):  # pragma: no cover - abstract
        raise NotImplementedError


class CorruptTracker:
    """Counts corrupt images by path and warns once per file."""

    def __init__(self):
        self.corrupt: Dict[str, str] = {}

    def add(self, items: List) -> None:
        for path, msg in items:
            if path not in self.corrupt:
                self.corrupt[path] = msg
                warnings.warn(f"skipped corrupt image {path}: {msg}", RuntimeWarning, stacklevel=3)

    @property
    def num_corrupt(self) -> int:
        return len(self.corrupt)


class _BatchTask(Dataset):
    """One item = one whole batch, decoded and augmented in a worker (deterministic per sample)."""

    def __init__(self, dataset: ImageDataset, transform: Callable, batches: List[List[int]], seed: int,
                 epoch: int, strict: bool, views: int = 1):
        self.dataset, self.transform, self.batches = dataset, transform, batches
        self.seed, self.epoch, self.strict, self.views = seed, epoch, strict, views

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict:
        imgs, labels, index, bad = [], [], [], []
        for i in self.batches[b]:
            img, label, err = self.dataset.load(i, self.strict)
            if img is None:
                bad.append((self.dataset.samples[i].path, err))
                continue
            views = []
            for v in range(self.views):
                with seeded(sample_seed(self.seed, self.epoch, i, v)):
                    views.append(self.transform(img))  # (3,H,W) in [-1,1]
            imgs.append(torch.stack(views) if self.views > 1 else views[0])
            labels.append(label)
            index.append(i)
        out = {"labels": torch.tensor(labels, dtype=torch.long), "index": torch.tensor(index, dtype=torch.long),
               "corrupt": bad}
        out["images"] = torch.stack(imgs) if imgs else torch.empty(0)
        return out


class TorchvisionImageLoader(ResumableLoader):
    """PIL decode + torchvision transforms in DataLoader workers.

    Yields ``{"images": (N,3,H,W) float in [-1,1] on device, "labels": (N,) long, "index": (N,) long}``
    (``images`` is (N,V,3,H,W) when ``views`` > 1). Corrupt images are dropped from their batch, so a
    batch can be shorter; they are listed in ``self.corrupt`` (path -> error).
    """

    backend = "torchvision"

    def __init__(self, dataset: ImageDataset, transform: Callable, sampler: ShardSampler, *, num_workers: int = 0,
                 device="cpu", strict: bool = False, views: int = 1):
        super().__init__(sampler)
        self.dataset, self.transform, self.num_workers = dataset, transform, num_workers
        self.device, self.strict, self.views = torch.device(device), strict, views
        self._tracker = CorruptTracker()

    @property
    def corrupt(self) -> Dict[str, str]:
        return self._tracker.corrupt

    def _iter_from(self, start: int):
        task = _BatchTask(self.dataset, self.transform, self.sampler.batches(start), self.sampler.seed, self.epoch,
                          self.strict, self.views)
        pin = self.device.type == "cuda"
        dl = DataLoader(task, batch_size=None, shuffle=False, num_workers=self.num_workers, pin_memory=pin,
                        prefetch_factor=4 if self.num_workers > 0 else None,
                        persistent_workers=False)
        for item in dl:
            self._tracker.add(item.pop("corrupt"))
            if len(item["labels"]) == 0:
                yield None
                continue
            yield {k: v.to(self.device, non_blocking=pin) for k, v in item.items()}


class OnlineLatentLoader(ResumableLoader):
    """Images -> frozen VAE on the fly: yields ``{"latents": (N,C,h,w) scaled, "labels": (N,)}`` on device.

    With ``posterior == "sample"`` the noise comes from a generator seeded by (seed, epoch, rank, batch),
    so a resumed run draws the same latents.
    """

    def __init__(self, image_loader: ResumableLoader, vae, posterior: str = "mean"):
        super().__init__(image_loader.sampler)
        self.images, self.vae, self.posterior = image_loader, vae, posterior
        self.keep_images = False   # True: batches also carry the [-1, 1] crops (REPA's online teacher reads them)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def corrupt(self) -> Dict[str, str]:
        return getattr(self.images, "corrupt", {})

    def _encode(self, batch: dict, b: int) -> dict:
        """Image batch number ``b`` of the epoch -> the latent batch."""
        gen = None
        if self.posterior == "sample":
            gen = torch.Generator(device=self.vae.device).manual_seed(
                sample_seed(self.sampler.seed, self.epoch, self.sampler.rank, b))
        z = self.vae.encode(batch["images"], posterior=self.posterior, generator=gen)  # (N,C,h,w)
        out = {"latents": z, "labels": batch["labels"], "index": batch["index"]}
        if self.keep_images:
            out["images"] = batch["images"]
        return out

    def _iter_from(self, start: int):
        self.images.epoch, self.images.position = self.epoch, start
        for b, batch in enumerate(self.images._iter_from(start), start=start):
            yield None if batch is None else self._encode(batch, b)
