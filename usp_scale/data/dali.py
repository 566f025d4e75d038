"""NVIDIA DALI image loader behind the same interface as :class:`TorchvisionImageLoader`.

``fn.readers.file`` (ImageFolder) or ``fn.readers.webdataset`` (tar shards) -> ``fn.decoders.image``
on ``device="mixed"`` (GPU, hardware JPEG decoder where present) or ``"cpu"`` -> the USP augmentations
-> ``crop_mirror_normalize`` to [-1, 1] CHW float.

Sharding: for ImageFolder the reader gets this rank's files of the epoch from :class:`ShardSampler`
(the very same files, in the same order, as the torchvision loader; global rank). For tar shards (training)
the list of tars is permuted per epoch, seeded by (seed, epoch) and the same on every rank, and DALI's own
contiguous ``shard_id``/``num_shards`` split of that list's samples gives each rank its part, so which tars a
rank reads changes every epoch; the pipeline is rebuilt per epoch; DALI shuffles within its buffer with a
per-epoch seed. Random augmentations are
DALI's (seeded by seed, epoch and rank); resuming mid-epoch replays the skipped batches through the
pipeline so the next batch is identical. The resampling filters differ from PIL: see docs/data.md.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np
import torch

from .datasets import CorruptImageError, ImageDataset, TarDataset
from .loaders import CorruptTracker, ResumableLoader
from .sampler import ShardSampler
from .transforms import eval_resize, sample_seed


# Augmentations with a DALI pipeline (which of them match the PIL path: usp_scale.data.build.DALI_TOLERANCE).
DALI_AUGMENTS = ("pretrain", "adm", "eval", "none")
# Exact BOX halvings done in DALI's ADM crop (images with min side >= 2**4 * size get an approximation).
ADM_MAX_HALVINGS = 3


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def looks_complete(path: str) -> bool:
    """Cheap truncation check (JPEG ends with EOI, PNG with IEND); the full decode is DALI's."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 12))
            tail = f.read()
    except OSError:
        return False
    if head[:2] == b"\xff\xd8":
        return tail.rstrip(b"\x00")[-2:] == b"\xff\xd9"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" in tail
    return size > 0


def _pipeline(source, augment: str, size: int, crop_scale_min: float, decode_device: str, flip: bool):
    """Build the DALI graph (called inside a ``pipeline_def``). Returns (images CHW float [-1,1], labels)."""
    from nvidia.dali import fn, math as dmath, types
    jpegs, labels = source
    mirror = fn.random.coin_flip(probability=0.5) if flip else 0
    cubic = types.INTERP_CUBIC
    norm = dict(dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3, std=[127.5] * 3)
    if augment == "pretrain":
        images = fn.decoders.image_random_crop(jpegs, device=decode_device, output_type=types.RGB,
                                               random_area=[crop_scale_min, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                               num_attempts=10)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=cubic, antialias=True)
        images = fn.crop_mirror_normalize(images, mirror=mirror, **norm)
    elif augment in ("eval", "adm"):
        # Geometry exactly as the PIL path (sizes, rounding, crop offsets); only the filters differ.
        shape = fn.peek_image_shape(jpegs)                                  # (H, W, C) int64, CPU
        h = fn.cast(shape[0], dtype=types.FLOAT)
        w = fn.cast(shape[1], dtype=types.FLOAT)
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
        if augment == "eval":
            # torchvision Resize(r): short side -> r, long side -> int(r * long / short); CenterCrop at round().
            r = float(eval_resize(size))
            short = dmath.min(h, w)
            h2 = dmath.floor(r * h / short)
            w2 = dmath.floor(r * w / short)
            h2 = h2 + (r - h2) * fn.cast(h <= w, dtype=types.FLOAT)         # the short side is exactly r
            w2 = w2 + (r - w2) * fn.cast(w < h, dtype=types.FLOAT)
            top, left = _round_half_even((h2 - size) / 2.0), _round_half_even((w2 - size) / 2.0)
        else:
            # ADM: BOX-halve (floor sides) while min side >= 2*size. A linear resize without antialiasing to
            # exactly half the size averages each 2x2 block, i.e. a BOX halving; up to ADM_MAX_HALVINGS steps
            # (a step that is not needed resizes to the same size, an identity).
            h1, w1 = h, w
            for _ in range(ADM_MAX_HALVINGS):
                need = fn.cast(dmath.min(h1, w1) >= 2.0 * size, dtype=types.FLOAT)
                h1 = h1 - need * (h1 - dmath.floor(h1 / 2.0))
                w1 = w1 - need * (w1 - dmath.floor(w1 / 2.0))
                images = fn.resize(images, resize_x=w1, resize_y=h1, interp_type=types.INTERP_LINEAR,
                                   antialias=False)
            s = size / dmath.min(h1, w1)
            h2, w2 = _round_half_even(h1 * s), _round_half_even(w1 * s)
            top, left = dmath.floor((h2 - size) / 2.0), dmath.floor((w2 - size) / 2.0)
        images = fn.resize(images, resize_x=w2, resize_y=h2, interp_type=cubic, antialias=True)
        images = fn.slice(images, start=fn.cast(fn.stack(top, left), dtype=types.INT32),
                          shape=[size, size], axis_names="HW")
        images = fn.crop_mirror_normalize(images, mirror=mirror if augment == "adm" else 0, **norm)
    elif augment == "none":
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=cubic, antialias=True)
        images = fn.crop_mirror_normalize(images, mirror=0, **norm)
    else:
        raise ValueError(f"data.augment={augment!r} has no DALI pipeline; use pretrain, adm, eval or none")
    return images, labels


class DALIImageLoader(ResumableLoader):
    """DALI decode + augment; yields ``{"images": (N,3,S,S) in [-1,1], "labels": (N,)}`` on the output device."""

    backend = "dali"

    def __init__(self, dataset: ImageDataset, sampler: ShardSampler, *, augment: str, size: int,
                 crop_scale_min: float = 0.2, device="cpu", decode_device: str = "auto", num_threads: int = 4,
                 strict: bool = False, precheck: bool = True, indices: Optional[List[int]] = None,
                 pipeline_seed: Optional[int] = None):
        """``indices``/``pipeline_seed`` (used by the latent-cache writer) read exactly these dataset positions,
        in order, with this DALI seed, instead of the sampler's epoch order and the (seed, epoch, rank) seed."""
        if not dali_available():
            raise RuntimeError("data.loader=dali but nvidia.dali is not installed: pip install nvidia-dali-cuda130 "
                               "(or -cuda120), or set data.loader=torchvision")
        super().__init__(sampler)
        flip = True
        if augment.endswith("_noflip"):
            augment, flip = augment[: -len("_noflip")], False
        if augment not in DALI_AUGMENTS:
            raise ValueError(f"data.augment={augment!r} has no DALI pipeline (pretrain, adm, eval, none); the timm "
                             f"finetune recipe (RandAugment, RandomErasing) needs data.loader=torchvision")
        self.dataset, self.augment, self.size, self.crop_scale_min = dataset, augment, size, crop_scale_min
        self.device = torch.device(device)
        if decode_device == "auto":
            decode_device = "mixed" if self.device.type == "cuda" else "cpu"
        if decode_device not in ("mixed", "cpu"):
            raise ValueError(f"data.dali_device={decode_device!r}; use auto, mixed or cpu")
        if decode_device == "mixed" and self.device.type != "cuda":
            raise ValueError("data.dali_device=mixed decodes on the GPU and needs a CUDA device (got device "
                             f"{self.device}); use data.dali_device=cpu")
        self.decode_device, self.num_threads, self.strict = decode_device, num_threads, strict
        self.indices, self.pipeline_seed = indices, pipeline_seed
        if indices is not None and isinstance(dataset, TarDataset):
            raise ValueError("reading chosen positions of WebDataset tars through DALI is not supported; "
                             "use the torchvision loader for them")
        self.is_tar = isinstance(dataset, TarDataset)
        self.flip = flip and augment in ("pretrain", "adm")
        self._tracker = CorruptTracker()
        self._valid = np.ones(len(dataset), bool)
        if precheck and self.is_tar:
            bad = [r.path for r in dataset.samples if not _member_complete(r)]
            if bad:
                # readers.webdataset cannot leave members out, and a failed decode stops the pipeline.
                raise CorruptImageError(f"{len(bad)} truncated images in the tar shards: {bad[:5]}; DALI's webdataset "
                                        f"reader cannot skip them: use data.loader=torchvision (skips and reports "
                                        f"them) or repair the shards")
        if precheck and not self.is_tar:
            for i, r in enumerate(dataset.samples):
                if not looks_complete(r.path):
                    self._valid[i] = False
                    if strict:
                        raise CorruptImageError(f"corrupt (truncated) image {r.path} (data.strict=true)")
                    self._tracker.add([(r.path, "truncated file (no end-of-image marker)")])

    @property
    def corrupt(self) -> Dict[str, str]:
        return self._tracker.corrupt

    def epoch_tars(self) -> List[str]:
        """The tar shards in this epoch's reading order, the same on every rank: a permutation seeded by
        (seed, epoch) when training (``sampler.shuffle``), else the sorted order. DALI splits the samples of
        this list contiguously over ranks, so the ranks' parts are disjoint, cover the data and move per epoch."""
        tars = list(self.dataset.tars)
        if not self.sampler.shuffle:
            return tars
        g = torch.Generator().manual_seed(self.sampler.seed * 1_000_003 + self.epoch)
        return [tars[i] for i in torch.randperm(len(tars), generator=g).tolist()]

    def _tar_counts(self) -> List[int]:
        """Samples per batch on this rank under DALI's contiguous webdataset sharding."""
        n, w, r, bs = len(self.dataset), self.sampler.world_size, self.sampler.rank, self.sampler.batch_size
        m = (r + 1) * n // w - r * n // w
        if self.sampler.even:
            m = min(m, n // w)
        nb = m // bs if self.sampler.drop_last else -(-m // bs)
        return [min(bs, m - b * bs) for b in range(nb)]

    def __len__(self) -> int:
        if self.indices is not None:
            return -(-len(self.indices) // self.sampler.batch_size)
        return len(self._tar_counts()) if self.is_tar else self.sampler.num_batches()

    def _build(self, files: List[str], labels: List[int]):
        from nvidia.dali import fn, pipeline_def
        bs = self.sampler.batch_size
        seed = self.pipeline_seed if self.pipeline_seed is not None else \
            sample_seed(self.sampler.seed, self.epoch, self.sampler.rank) % (1 << 31)
        dev_id = self.device.index if self.device.type == "cuda" else None
        if self.device.type == "cuda" and dev_id is None:
            dev_id = torch.cuda.current_device()

        @pipeline_def(batch_size=bs, num_threads=self.num_threads, device_id=dev_id, seed=seed,
                      prefetch_queue_depth=2)
        def pipe():
            if self.is_tar:
                src = fn.readers.webdataset(paths=self.epoch_tars(), ext=["jpg;jpeg;png;webp", "cls"],
                                            missing_component_behavior="skip", shard_id=self.sampler.rank,
                                            num_shards=self.sampler.world_size, random_shuffle=self.sampler.shuffle,
                                            initial_fill=1024, seed=seed, pad_last_batch=True, name="Reader")
                jpegs, cls = src
                # .cls holds ASCII digits: pad them to a fixed width here, parse them on the host (_parse_cls)
                src = (jpegs, fn.pad(cls, fill_value=32, shape=[CLS_WIDTH]))
            else:
                src = fn.readers.file(files=files, labels=labels, random_shuffle=False, pad_last_batch=True,
                                      name="Reader")
            return _pipeline(src, self.augment, self.size, self.crop_scale_min, self.decode_device, self.flip)

        p = pipe()
        p.build()
        return p

    def _iter_from(self, start: int):
        nb = len(self)
        bs = self.sampler.batch_size
        if self.is_tar:
            files, labels, counts = None, None, self._tar_counts()
        else:
            order = self.indices if self.indices is not None else self.sampler.indices().tolist()
            order = [i for i in order if self._valid[i]]
            counts = [len(order[b * bs:(b + 1) * bs]) for b in range(nb)]
            files = [self.dataset.samples[i].path for i in order] or [self.dataset.samples[0].path]
            labels = [self.dataset.samples[i].label for i in order] or [0]
        if self.is_tar or files:
            pipe = self._build(files, labels)
        for b in range(nb):
            if counts[b] == 0:
                if b >= start:
                    yield None
                continue
            try:
                images, lab = pipe.run()
            except RuntimeError as e:
                chunk = files[b * bs:(b + 1) * bs] if files else self.dataset.tars
                msg = f"DALI pipeline failed on a batch from {chunk[:4]}...: {e}"
                if "decod" in str(e).lower():
                    raise CorruptImageError(msg + "\nA file that fails to decode is corrupt; data.loader=torchvision "
                                                  "skips and reports such files one by one") from e
                raise RuntimeError(msg) from e
            if b < start:
                continue  # replay: the skipped batches advance DALI's RNG exactly as in the first run
            n = counts[b]
            extra = {} if self.is_tar else {"index": torch.tensor(order[b * bs:b * bs + n], device=self.device)}
            lab = _parse_cls(_to_torch(lab, torch.device("cpu"))) if self.is_tar else _to_torch(lab, torch.device("cpu"))
            yield {"images": _to_torch(images, self.device)[:n], "labels": lab.long().view(-1)[:n].to(self.device),
                   **extra}
        if self.is_tar or files:
            del pipe


def _round_half_even(x):
    """Python's round() on a DALI float DataNode: floor(x + 0.5), except exact halves go to the even side."""
    from nvidia.dali import math as dmath
    k = dmath.floor(x)
    half = x - k                                  # in [0, 1)
    up = dmath.floor(half * 2.0)                  # 1 when half >= 0.5
    exact_half = up * (dmath.floor(half * 2.0) - dmath.floor(half * 2.0 - 1e-6))  # 1 only when half == 0.5
    parity = k - 2.0 * dmath.floor(k / 2.0)       # 1 when k is odd
    return k + up - exact_half * (1.0 - parity)


def _member_complete(r) -> bool:
    with open(r.tar, "rb") as f:
        f.seek(r.offset)
        head = f.read(2)
        f.seek(r.offset + max(0, r.size - 12))
        tail = f.read(min(12, r.size))
    if head == b"\xff\xd8":
        return tail.rstrip(b"\x00")[-2:] == b"\xff\xd9"
    return r.size > 0


CLS_WIDTH = 12  # .cls members are padded to this many bytes (class ids up to 12 digits)


def _parse_cls(raw: torch.Tensor) -> torch.Tensor:
    """(N, CLS_WIDTH) uint8 ASCII (digits, spaces/newlines) -> (N,) int64 class ids."""
    raw = raw.view(raw.shape[0], -1).long()
    digit = (raw >= 48) & (raw <= 57)
    if not bool(digit.any(1).all()):
        bad = [bytes(r.tolist()) for r in raw[~digit.any(1)]][:3]
        raise ValueError(f"WebDataset .cls members without a class id: {bad}")
    out = torch.zeros(raw.shape[0], dtype=torch.long)
    for j in range(raw.shape[1]):  # left to right; non-digits (whitespace) are skipped
        d = digit[:, j]
        out = torch.where(d, out * 10 + (raw[:, j] - 48), out)
    return out


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) -> torch tensor on ``device``."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    t = tl.as_tensor()
    dtype = to_torch_type[t.dtype]
    if hasattr(tl, "as_cpu") and type(tl).__name__.endswith("GPU"):
        out = torch.empty(t.shape(), dtype=dtype, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(t)).to(device)
