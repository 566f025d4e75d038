"""PIL/torchvision augmentations of USP (docs/method.md §2.1, §4.1, §6), all ending in [-1, 1] tensors.

Randomness is made per sample and reproducible: a transform is applied inside
:func:`seeded`, which seeds python ``random``, numpy and the torch CPU generator from
``(seed, epoch, index, view)`` and restores the caller's generator states afterwards. The same
sample therefore gets the same crop in any worker, on any rank and after a resume.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import random
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

# data.augment's values (the config's choices refer to this tuple), and what build_transform takes: those and the
# flip-less variants of the cached crops
AUGMENT_NAMES = ("pretrain", "adm", "eval", "finetune", "linprobe", "none")
AUGMENTS = AUGMENT_NAMES + ("adm_noflip", "pretrain_noflip")
# RandAugment's fill colour for the geometric ops in the official finetuning recipe: round(255 x the ImageNet mean),
# which timm derives from the mean passed to create_transform (the official code passes the ImageNet mean there).
RANDAUG_FILL = (124, 116, 104)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, index, view, ...); stable across runs and processes."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int):
    """Seed python/numpy/torch-CPU RNGs for one sample; restore the previous states on exit."""
    py_state, np_state, t_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(t_state)


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM / guided-diffusion center crop (docs/method.md §4.1).

    1. while min(W, H) >= 2*size: resize to (W//2, H//2) with BOX (exact 2x2 averaging);
    2. bicubic resize by size/min(W, H), each side rounded (Python ``round``);
    3. crop size x size at offsets floor((H-size)/2), floor((W-size)/2).
    """
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    w, h = img.size
    top, left = (h - size) // 2, (w - size) // 2
    return img.crop((left, top, left + size, top + size))


class ADMCenterCrop:
    """Callable wrapper of :func:`adm_center_crop`."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        return adm_center_crop(img, self.size)

    def __repr__(self) -> str:
        return f"ADMCenterCrop(size={self.size})"


class OneDrawRandomResizedCrop(T.RandomResizedCrop):
    """The linear-probe crop of the official code (MAE's main_linprobe): one draw, no retries.

    Target area ~ U(scale) x image area, aspect ratio log-uniform in ``ratio``; the sides
    w = round(sqrt(area * r)), h = round(sqrt(area / r)) are clipped to the image, then the offsets are uniform
    integers. torchvision's RandomResizedCrop instead retries up to 10 times for a crop that fits and falls back
    to a center crop, which gives another distribution of crops.
    """

    @staticmethod
    def get_params(img, scale, ratio):
        width, height = T.functional.get_image_size(img)
        area = height * width
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = min(int(round(math.sqrt(target_area * aspect))), width)
        h = min(int(round(math.sqrt(target_area / aspect))), height)
        top = torch.randint(0, height - h + 1, size=(1,)).item()
        left = torch.randint(0, width - w + 1, size=(1,)).item()
        return top, left, h, w


def eval_resize(size: int) -> int:
    """Resize side of the evaluation crop: 256 for 224 (crop ratio 0.875)."""
    return int(round(size / 0.875))


def to_unit_range() -> T.Compose:
    """PIL -> float tensor (3,H,W) in [-1, 1] (ToTensor then mean 0.5 / std 0.5)."""
    return T.Compose([T.ToTensor(), T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])])


def build_transform(augment: str, size: int, crop_scale_min: float = 0.2, flip: bool = True) -> Callable:
    """PIL image -> (3, size, size) tensor in [-1, 1] for one augmentation name.

    pretrain: RandomResizedCrop(size, scale (crop_scale_min, 1), ratio 3/4-4/3, bicubic) + hflip 0.5 (§2.1).
    adm:      ADM center crop + hflip 0.5 (§4.1).           eval: Resize(size/0.875, bicubic) + CenterCrop (§6.1).
    finetune: timm RandomResizedCrop 0.08-1 bicubic + hflip + RandAugment rand-m9-mstd0.5-inc1 (fill
              RANDAUG_FILL) + RandomErasing 0.25 pixel mode (§6.2).
    linprobe: :class:`OneDrawRandomResizedCrop` (scale 0.08-1, ratio 3/4-4/3, bicubic) + hflip 0.5 (§6.3).
    none:     bicubic resize to size x size.
    ``*_noflip`` variants (and ``flip=False``) omit the flip; the latent cache stores flips explicitly.
    """
    if augment.endswith("_noflip"):
        augment, flip = augment[: -len("_noflip")], False
    if augment not in AUGMENT_NAMES:
        raise ValueError(f"data.augment={augment!r} is unknown; choose one of {AUGMENTS}")
    bicubic = InterpolationMode.BICUBIC
    flips = [T.RandomHorizontalFlip(0.5)] if flip else []
    if augment == "pretrain":
        ops = [T.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), ratio=(3 / 4, 4 / 3), interpolation=bicubic)]
        return T.Compose(ops + flips + [to_unit_range()])
    if augment == "linprobe":
        crop = OneDrawRandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=bicubic)
        return T.Compose([crop] + flips + [to_unit_range()])
    if augment == "adm":
        return T.Compose([ADMCenterCrop(size)] + flips + [to_unit_range()])
    if augment == "eval":
        return T.Compose([T.Resize(eval_resize(size), interpolation=bicubic), T.CenterCrop(size), to_unit_range()])
    if augment == "none":
        return T.Compose([T.Resize((size, size), interpolation=bicubic), to_unit_range()])
    # finetune: timm's training transform with the arguments of docs/method.md §6.2, normalised to [-1, 1].
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment
    tf = create_transform(size, is_training=True, scale=(0.08, 1.0), hflip=0.5 if flip else 0.0,
                          auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25,
                          re_mode="pixel", re_count=1, color_jitter=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    # timm fills with round(255 x mean) = (128, 128, 128) for mean 0.5; the official recipe fills with the ImageNet
    # mean colour while normalising with 0.5 / 0.5.
    augs = [t for t in tf.transforms if isinstance(t, RandAugment)]
    if len(augs) != 1:
        raise RuntimeError(f"timm's finetune transform changed: expected one RandAugment in {tf}")
    for op in augs[0].ops:
        op.kwargs["fillcolor"] = RANDAUG_FILL
    return tf


def describe_augment(augment: str, size: int, crop_scale_min: float = 0.2) -> dict:
    """JSON-able description of an augmentation (written into latent-cache manifests)."""
    return {"name": augment, "size": size, "crop_scale_min": crop_scale_min,
            "repr": repr(build_transform(augment, size, crop_scale_min))}
