"""Augmentations: ADM center crop against explicit references, RandomResizedCrop bounds, determinism."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from usp_scale.data.transforms import adm_center_crop, build_transform, sample_seed, seeded


def _box_halve_reference(a: np.ndarray) -> np.ndarray:
    """PIL's BOX 2x reduction written out: horizontal pair means, then vertical, each rounded half up."""
    h, w, c = a.shape
    a = a[: h // 2 * 2, : w // 2 * 2].astype(np.int64)
    hor = np.floor(a.reshape(h // 2 * 2, w // 2, 2, c).sum(2) / 2 + 0.5)
    return np.floor(hor.reshape(h // 2, 2, w // 2, c).sum(1) / 2 + 0.5).astype(np.uint8)


def test_adm_crop_tiny_explicit_reference():
    # 12x8 (WxH), size 2: halve while min side >= 4 -> 6x4 -> 3x2; scale 2/2 = 1 (no resample); crop at (0, 0).
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 12, 3)).astype(np.uint8)
    out = np.asarray(adm_center_crop(Image.fromarray(a), 2))
    ref = _box_halve_reference(_box_halve_reference(a))[0:2, 0:2]
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("wh,size,halved,resized,offset", [
    ((1030, 700), 256, (515, 350), (377, 256), (60, 0)),    # one halving, width rounded up (376.69 -> 377)
    ((600, 515), 256, (300, 257), (299, 256), (21, 0)),     # 515 >= 512 halves once; 298.83 -> 299
    ((700, 2100), 256, (350, 1050), (256, 768), (0, 256)),  # tall: crop offset on the height
    ((300, 300), 256, (300, 300), (256, 256), (0, 0)),      # no halving, plain bicubic downscale
    ((2048, 1100), 256, (512, 275), (477, 256), (110, 0)),  # two halvings, floor sides (1024,550)->(512,275)
])
def test_adm_crop_sizes_and_offsets(wh, size, halved, resized, offset):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3)).astype(np.uint8))
    ref = img
    while min(ref.size) >= 2 * size:
        ref = ref.resize((ref.size[0] // 2, ref.size[1] // 2), Image.BOX)
    assert ref.size == halved
    ref = ref.resize(resized, Image.BICUBIC)
    ref = ref.crop((offset[0], offset[1], offset[0] + size, offset[1] + size))
    out = adm_center_crop(img, size)
    assert out.size == (size, size)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_pretrain_transform_matches_the_spec():
    tr = build_transform("pretrain", 224, 0.2)
    rrc, flip = tr.transforms[0], tr.transforms[1]
    assert isinstance(rrc, T.RandomResizedCrop) and rrc.size == (224, 224)
    assert rrc.scale == (0.2, 1.0) and rrc.ratio == pytest.approx((3 / 4, 4 / 3))
    assert rrc.interpolation == InterpolationMode.BICUBIC
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in build_transform("pretrain_noflip", 224).transforms)


def test_random_resized_crop_bounds():
    img = Image.new("RGB", (320, 200))
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    fallbacks = 0
    for s in range(300):
        with seeded(sample_seed(0, 0, s, 0)):
            i, j, h, w = T.RandomResizedCrop.get_params(img, scale, ratio)
        assert 0 <= i and 0 <= j and i + h <= 200 and j + w <= 320
        area = h * w / (320 * 200)
        if (h, w) == (200, 200) or (h, w) == (200, int(round(200 * 4 / 3))):
            fallbacks += 1
            continue
        # w, h are rounded from sqrt(area*ratio): allow one pixel of rounding
        assert scale[0] - 0.01 <= area <= scale[1] + 1e-9
        assert ratio[0] * (1 - 2 / h) - 1e-9 <= w / h <= ratio[1] * (1 + 2 / h) + 1e-9
    assert fallbacks < 30


def test_seeded_is_deterministic_and_restores_global_rng():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (60, 80, 3)).astype(np.uint8))
    tr = build_transform("pretrain", 32)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    with seeded(sample_seed(0, 1, 5, 0)):
        a = tr(img)
    after = torch.rand(1)
    with seeded(sample_seed(0, 1, 5, 0)):
        b = tr(img)
    with seeded(sample_seed(0, 2, 5, 0)):
        c = tr(img)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(before, after)  # the caller's generator is untouched
    assert a.shape == (3, 32, 32) and a.min() >= -1 and a.max() <= 1


def test_eval_and_finetune_transforms():
    img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (300, 400, 3)).astype(np.uint8))
    ev = build_transform("eval", 224)(img)
    ref = T.Compose([T.Resize(256, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()])(img)
    torch.testing.assert_close(ev, ref * 2 - 1, atol=1e-6, rtol=0)
    with seeded(7):
        ft = build_transform("finetune", 64)(img)
    assert ft.shape == (3, 64, 64)
    with pytest.raises(ValueError, match="data.augment='bogus' is unknown"):
        build_transform("bogus", 32)


def test_linprobe_crop_is_one_draw_with_clipped_sides():
    """The official probe crop: one draw of area and log-aspect, sides rounded and clipped to the image, uniform
    offsets; no retries (torchvision's RandomResizedCrop retries and falls back to a center crop)."""
    import math

    from PIL import Image

    from usp_scale.data.transforms import OneDrawRandomResizedCrop
    img = Image.new("RGB", (100, 40))
    clipped = 0
    for k in range(300):
        torch.manual_seed(k)
        top, left, h, w = OneDrawRandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        torch.manual_seed(k)   # the same draws, by hand
        area = 4000 * torch.empty(1).uniform_(0.08, 1.0).item()
        lr = torch.log(torch.tensor((3 / 4, 4 / 3)))
        r = torch.exp(torch.empty(1).uniform_(lr[0], lr[1])).item()
        ww, hh = min(int(round(math.sqrt(area * r))), 100), min(int(round(math.sqrt(area / r))), 40)
        t = torch.randint(0, 40 - hh + 1, size=(1,)).item()
        le = torch.randint(0, 100 - ww + 1, size=(1,)).item()
        assert (top, left, h, w) == (t, le, hh, ww)
        clipped += int(round(math.sqrt(area / r))) > 40
    assert clipped > 50     # many draws do not fit the 40 px side and are clipped, not redrawn
