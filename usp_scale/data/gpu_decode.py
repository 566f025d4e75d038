"""Decode and crop on the training device, with the crops of the PIL path (``data.loader: gpu``).

DataLoader workers only read the file bytes, the image size (from the header, no decode) and draw the crop:
inside ``seeded(sample_seed(seed, epoch, index, view))`` they make the same random calls, in the same order, as the
PIL pipeline ``Compose([RandomResizedCrop, RandomHorizontalFlip, ...])`` (torchvision's ``get_params`` on an image of
that size, then the flip's coin), so every sample gets the crop box and flip it gets with ``data.loader=torchvision``.
On the device: ``torchvision.io.decode_jpeg`` (nvJPEG on a GPU, batched; libjpeg-turbo on the CPU), then per image
``resized_crop`` with torch's antialiased bicubic (PIL's filter, a = -0.5, support widened when shrinking) on uint8,
the flip, and [-1, 1] scaling.

What can differ from the PIL pixels: the JPEG decoder on a GPU (nvJPEG's IDCT and chroma upsampling; on the CPU
both paths use libjpeg-turbo) and the resampling arithmetic (PIL's fixed-point passes vs torch's); measured in
tests/test_data_gpu_decode.py and docs/data.md. Augmentations: ``pretrain`` (RandomResizedCrop + flip) and
``eval`` (Resize + CenterCrop); non-JPEG files are decoded on the CPU by torchvision.io and then moved.
"""
from __future__ import annotations

import io
from typing import Dict, List

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .datasets import DECODE_ERRORS, CorruptImageError, ImageDataset
from .loaders import CorruptTracker, ResumableLoader
from .sampler import ShardSampler
from .transforms import eval_resize, sample_seed, seeded

GPU_AUGMENTS = ("pretrain", "eval")


def _as_is(item):
    return item


class _CropTask(Dataset):
    """One item = one batch: bytes, crop boxes (top, left, h, w) in source pixels, flips, labels, indices."""

    def __init__(self, dataset: ImageDataset, batches: List[List[int]], augment: str, size: int, scale_min: float,
                 seed: int, epoch: int, strict: bool):
        self.dataset, self.batches, self.augment, self.size = dataset, batches, augment, size
        self.scale_min, self.seed, self.epoch, self.strict = scale_min, seed, epoch, strict
        self.rrc = T.RandomResizedCrop(size, scale=(scale_min, 1.0), ratio=(3 / 4, 4 / 3))

    def __len__(self) -> int:
        return len(self.batches)

    def _box(self, img: Image.Image, i: int):
        w, h = img.size
        if self.augment == "eval":
            return (0, 0, h, w), False  # resize whole image, then center crop (on the device)
        with seeded(sample_seed(self.seed, self.epoch, i, 0)):
            top, left, ch, cw = self.rrc.get_params(img, self.rrc.scale, self.rrc.ratio)
            flip = bool(torch.rand(1) < 0.5)
        return (top, left, ch, cw), flip

    def __getitem__(self, b: int) -> dict:
        data, boxes, flips, labels, index, bad = [], [], [], [], [], []
        for i in self.batches[b]:
            r = self.dataset.samples[i]
            try:
                raw = self.dataset.read_bytes(i)
                with Image.open(io.BytesIO(raw)) as img:  # header only: size, no pixel decode
                    box, flip = self._box(img, i)
                    jpeg = img.format == "JPEG"
            except DECODE_ERRORS as e:
                if self.strict:
                    raise CorruptImageError(f"corrupt image {r.path}: {type(e).__name__}: {e}") from e
                bad.append((r.path, f"{type(e).__name__}: {e}"))
                continue
            data.append((torch.frombuffer(bytearray(raw), dtype=torch.uint8), jpeg))
            boxes.append(box)
            flips.append(flip)
            labels.append(r.label)
            index.append(i)
        return {"data": data, "boxes": boxes, "flips": flips, "labels": torch.tensor(labels, dtype=torch.long),
                "index": torch.tensor(index, dtype=torch.long), "corrupt": bad}


class GPUCropLoader(ResumableLoader):
    """Decode + crop on ``device``; yields ``{"images": (N,3,S,S) fp32 in [-1,1], "labels", "index"}`` there.

    The same sampler, crops and flips as :class:`~usp_scale.data.loaders.TorchvisionImageLoader` (module docstring).
    A file the decoder rejects is dropped from its batch and reported in ``corrupt`` (an error under ``strict``).
    """

    backend = "gpu"

    def __init__(self, dataset: ImageDataset, sampler: ShardSampler, *, augment: str, size: int,
                 crop_scale_min: float = 0.2, num_workers: int = 0, device="cpu", strict: bool = False):
        super().__init__(sampler)
        if augment not in GPU_AUGMENTS:
            raise ValueError(f"data.loader=gpu implements data.augment {' or '.join(GPU_AUGMENTS)}, not {augment!r}: "
                             "use data.loader=torchvision")
        self.dataset, self.augment, self.size, self.crop_scale_min = dataset, augment, size, crop_scale_min
        self.num_workers, self.device, self.strict = num_workers, torch.device(device), strict
        self._tracker = CorruptTracker()

    @property
    def corrupt(self) -> Dict[str, str]:
        return self._tracker.corrupt

    def _decode(self, data: list) -> list:
        """[(bytes uint8, is_jpeg)] -> [uint8 (3,H,W) on device or None]; batched nvJPEG for the JPEGs on a GPU."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg
        out: list = [None] * len(data)
        jpegs = [k for k, (_, j) in enumerate(data) if j]
        on_gpu = self.device.type == "cuda"
        if jpegs and on_gpu:
            try:
                dec = decode_jpeg([data[k][0] for k in jpegs], mode=ImageReadMode.RGB, device=self.device)
                for k, img in zip(jpegs, dec):
                    out[k] = img
            except RuntimeError:
                pass  # one bad file fails the batch: decode one by one below to find it
        for k, (raw, jpeg) in enumerate(data):
            if out[k] is not None:
                continue
            try:
                if jpeg and on_gpu:
                    out[k] = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
                else:
                    out[k] = decode_image(raw, mode=ImageReadMode.RGB).to(self.device, non_blocking=True)
            except RuntimeError as e:
                out[k] = e
        return out

    def _crop(self, img: torch.Tensor, box, flip: bool) -> torch.Tensor:
        bicubic = InterpolationMode.BICUBIC
        if self.augment == "eval":
            img = TF.resize(img, [eval_resize(self.size)], interpolation=bicubic, antialias=True)
            return TF.center_crop(img, [self.size, self.size])
        top, left, h, w = box
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], interpolation=bicubic, antialias=True)
        return TF.horizontal_flip(img) if flip else img

    def _iter_from(self, start: int):
        task = _CropTask(self.dataset, self.sampler.batches(start), self.augment, self.size, self.crop_scale_min,
                         self.sampler.seed, self.epoch, self.strict)
        dl = DataLoader(task, batch_size=None, shuffle=False, num_workers=self.num_workers,
                        prefetch_factor=4 if self.num_workers > 0 else None, collate_fn=_as_is)
        for item in dl:
            self._tracker.add(item["corrupt"])
            keep, crops = [], []
            for k, (img, box, flip) in enumerate(zip(self._decode(item["data"]), item["boxes"], item["flips"])):
                if isinstance(img, Exception):
                    path = self.dataset.samples[int(item["index"][k])].path
                    if self.strict:
                        raise CorruptImageError(f"corrupt image {path}: {img}")
                    self._tracker.add([(path, f"decode failed: {img}")])
                    continue
                keep.append(k)
                crops.append(self._crop(img, box, flip))
            if not crops:
                yield None
                continue
            x = torch.stack(crops).float().div_(127.5).sub_(1.0)  # uint8 -> [-1, 1], as ToTensor + Normalize(0.5)
            sel = torch.tensor(keep, dtype=torch.long)
            yield {"images": x, "labels": item["labels"][sel].to(self.device, non_blocking=True),
                   "index": item["index"][sel].to(self.device, non_blocking=True)}
