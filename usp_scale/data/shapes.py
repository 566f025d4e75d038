"""A synthetic benchmark task where the representation matters by construction: classes are shapes in an arrangement.

Every image holds two class objects, one above the other, and clutter. The class is the ordered pair (the shape
on top, the shape below) out of five shapes (disc, ring, plus, bar, triangle); the ten classes are five unordered
pairs in both orders, so neither which shapes appear nor the shape at one position decides the class: the shapes
*and* their arrangement do. Everything else is drawn independently of the class, per image: each object's colour
and texture (plain, stripes, checker, in random colours), its size, its own rotation, the background (a random
two-colour gradient, sometimes textured), the pair's position, spacing and tilt (up to 25 degrees from vertical),
and the clutter (up to three strokes and dots, drawn behind or over the objects, so they occlude them). Colour and
texture statistics therefore say nothing about the class (a classifier on them is at chance, see
``tests/test_data_shapes.py``), which is what made the old set (``data/synthetic.py``, one colour and texture per
class) easy for a random encoder.

Splits (ImageFolder, ``class_XXX`` folders, JPEG):

* ``train/``: the large pool. USP's pretraining reads it without labels (the MAE task has no label input); the
  class-conditional DiT/SiT train on it with labels, as the paper's generators train on the images of ImageNet
  that the MAE saw.
* ``labeled/``: the first ``labeled_per_class`` images of each class of ``train/`` (copies): the few labels of the
  probes and of the label-scarce finetuning. With ``labeled_sets`` = n > 1, ``labeled_1/`` .. ``labeled_{n-1}/``
  hold the next disjoint groups of ``labeled_per_class`` images per class (one labelled set per seed of a
  benchmark, so its spread includes which images were labelled).
* ``val/``: held-out images for every top-1 and the FID reference.

Deterministic: image ``i`` of class ``c`` in split ``s`` is drawn from a generator seeded by ``(seed, s, c, i)``,
so the same arguments give identical files, and a larger pool extends a smaller one image for image.
"""
from __future__ import annotations

import colorsys
import math
import os
import shutil
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..fileio import write_json

KIND = "shapes"
SHAPES = ("disc", "ring", "plus", "bar", "triangle")
# (shape on top, shape below): five unordered pairs in both orders; every shape appears in four classes.
PAIRS = (("disc", "ring"), ("ring", "disc"), ("plus", "bar"), ("bar", "plus"), ("triangle", "disc"),
         ("disc", "triangle"), ("ring", "plus"), ("plus", "ring"), ("bar", "triangle"), ("triangle", "bar"))
SPLITS = ("train", "val")          # drawn splits; labeled/ copies the head of train/
MAX_TILT_DEG = 25.0


def class_spec(c: int) -> dict:
    """What defines class ``c``: the shape on top and the shape below."""
    if not 0 <= c < len(PAIRS):
        raise ValueError(f"the shapes task has {len(PAIRS)} classes (0..{len(PAIRS) - 1}), not class {c}")
    top, bottom = PAIRS[c]
    return {"top": top, "bottom": bottom}


def _rgb(rng: np.random.Generator, s=(0.45, 1.0), v=(0.45, 1.0)) -> Tuple[int, int, int]:
    h, ss, vv = rng.uniform(0, 1), rng.uniform(*s), rng.uniform(*v)
    return tuple(int(255 * x) for x in colorsys.hsv_to_rgb(h, ss, vv))


def _texture(rng: np.random.Generator, w: int, h: int, base, kind: str) -> Image.Image:
    """A layer of colour ``base`` with stripes or a checkerboard of a second random colour (``kind``)."""
    tex = Image.new("RGB", (w, h), base)
    if kind == "plain":
        return tex
    d = ImageDraw.Draw(tex)
    other = _rgb(rng)
    period = max(4, int(min(w, h) * rng.uniform(0.12, 0.18)))    # coarse enough to survive a x8 VAE
    if kind == "stripes":
        ang = rng.uniform(0, math.pi)
        dx, dy = math.cos(ang), math.sin(ang)
        for k in range(-2 * max(w, h), 2 * max(w, h), period):
            cx, cy = w / 2 + dx * k, h / 2 + dy * k   # stripes perpendicular to (dx, dy)
            d.line([(cx - dy * 2 * w, cy + dx * 2 * w), (cx + dy * 2 * w, cy - dx * 2 * w)], fill=other,
                   width=max(1, period // 2))
    else:  # checker
        off = int(rng.integers(0, period))
        for x in range(-off, w, period):
            for y in range(-off, h, period):
                if ((x + off) // period + (y + off) // period) % 2 == 0:
                    d.rectangle([x, y, x + period - 1, y + period - 1], fill=other)
    return tex


def _shape_mask(shape: str, w: int, h: int, cx: float, cy: float, r: float, rot: float) -> Image.Image:
    """An L mask of one object of radius ``r`` (its extent from the centre) rotated by ``rot``."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)

    def rect(half_len, half_wid, a):
        ux, uy = math.cos(a), math.sin(a)
        vx, vy = -uy, ux
        return [(cx + s1 * ux * half_len + s2 * vx * half_wid, cy + s1 * uy * half_len + s2 * vy * half_wid)
                for s1, s2 in ((-1, -1), (1, -1), (1, 1), (-1, 1))]

    if shape == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
    elif shape == "plus":
        for a in (rot, rot + math.pi / 2):
            d.polygon(rect(r, 0.3 * r, a), fill=255)
    elif shape == "bar":
        d.polygon(rect(r * 1.1, 0.38 * r, rot), fill=255)
    elif shape == "triangle":
        d.polygon([(cx + 1.15 * r * math.cos(rot + k * 2 * math.pi / 3),
                    cy + 1.15 * r * math.sin(rot + k * 2 * math.pi / 3)) for k in range(3)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")
    return m


def _clutter(img: Image.Image, rng: np.random.Generator, n: int) -> None:
    """``n`` distractors: strokes across the image and small dots, in random colours."""
    w, h = img.size
    s = min(w, h)
    d = ImageDraw.Draw(img)
    for _ in range(n):
        col = _rgb(rng)
        if rng.uniform() < 0.6:
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            a, ln = rng.uniform(0, math.pi), rng.uniform(0.3, 0.8) * s
            d.line([(x0, y0), (x0 + ln * math.cos(a), y0 + ln * math.sin(a))], fill=col,
                   width=int(rng.integers(2, max(2, s // 20) + 1)))
        else:
            x0, y0, rr = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.06) * s
            d.rectangle([x0 - rr, y0 - rr, x0 + rr, y0 + rr], fill=col)


def render(c: int, rng: np.random.Generator, size: int) -> Image.Image:
    """One RGB image (size x size) of class ``c``."""
    spec = class_spec(c)
    w = h = size
    # background: a gradient between two random colours, textured one time in three
    c0, c1 = np.array(_rgb(rng, v=(0.2, 0.9))), np.array(_rgb(rng, v=(0.2, 0.9)))
    ga = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w] / max(size - 1, 1)
    t = ((xx - 0.5) * math.cos(ga) + (yy - 0.5) * math.sin(ga)) / 1.42 + 0.5
    bg = Image.fromarray((c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.uint8))
    if rng.uniform() < 1 / 3:
        kind = ("stripes", "checker")[int(rng.integers(0, 2))]
        bg = Image.blend(bg, _texture(rng, w, h, _rgb(rng), kind), 0.25)
    img = bg
    n_clutter = int(rng.integers(0, 4))
    n_behind = int(rng.integers(0, n_clutter + 1))
    _clutter(img, rng, n_behind)
    # the pair: centre, tilt of its axis from vertical, spacing; each object its own size, rotation, look
    r = size * rng.uniform(0.15, 0.2)
    tilt = math.radians(rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG))
    sep = r * rng.uniform(2.1, 2.7)
    ux, uy = math.sin(tilt), -math.cos(tilt)          # unit vector pointing "up" in image coordinates
    half_x, half_y = abs(ux) * sep / 2 + 1.15 * r, abs(uy) * sep / 2 + 1.15 * r
    cx = rng.uniform(min(half_x, w / 2), max(w - half_x, w / 2))
    cy = rng.uniform(min(half_y, h / 2), max(h - half_y, h / 2))
    for shape, sign in ((spec["top"], 1), (spec["bottom"], -1)):
        ri = r * rng.uniform(0.85, 1.15)
        ox, oy = cx + sign * ux * sep / 2, cy + sign * uy * sep / 2
        mask = _shape_mask(shape, w, h, ox, oy, ri, rng.uniform(0, 2 * math.pi))
        kind = ("plain", "plain", "stripes", "checker")[int(rng.integers(0, 4))]
        # a colour that stands out from the background under the object (an object may still hide in clutter)
        under = np.asarray(img.getpixel((int(min(max(ox, 0), w - 1)), int(min(max(oy, 0), h - 1)))), float)
        col = _rgb(rng)
        for _ in range(8):
            if np.linalg.norm(np.asarray(col, float) - under) >= 90:
                break
            col = _rgb(rng)
        img.paste(_texture(rng, w, h, col, kind), (0, 0), mask)
    _clutter(img, rng, n_clutter - n_behind)
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 5, (h, w, 1)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def labeled_split(k: int) -> str:
    """The folder of labelled set ``k`` (``labeled``, ``labeled_1``, ...)."""
    return "labeled" if k == 0 else f"labeled_{k}"


def make_shapes(out: str, per_class: int = 1000, val_per_class: int = 50, labeled_per_class: int = 10,
                size: int = 64, seed: int = 0, quality: int = 92, progress: bool = False,
                labeled_sets: int = 1) -> Dict:
    """Write ``out/{train,labeled,val}/class_XXX/*.jpg`` and ``out/synthetic.json`` (the summary, returned)."""
    classes = len(PAIRS)
    if per_class < 1 or val_per_class < 1 or size < 16:
        raise ValueError("the shapes task needs per_class >= 1, val_per_class >= 1 and size >= 16")
    if labeled_sets < 1 or not 0 <= labeled_per_class * labeled_sets <= per_class:
        raise ValueError(f"labeled_per_class={labeled_per_class} x labeled_sets={labeled_sets} must lie in "
                         f"0..per_class={per_class} (the labelled sets are disjoint groups at the head of the train "
                         "pool)")
    summary = {"kind": KIND, "classes": classes, "per_class": per_class, "val_per_class": val_per_class,
               "labeled_per_class": labeled_per_class, "labeled_sets": labeled_sets, "size": size, "seed": seed, "max_aspect": 1.0,
               "quality": quality, "styles": [class_spec(c) for c in range(classes)]}
    files: Dict[str, List[Tuple[str, int]]] = {"train": [], "val": []}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=classes * (per_class + val_per_class), unit="img", desc="shapes")
    for si, (split, n) in enumerate((("train", per_class), ("val", val_per_class))):
        for c in range(classes):
            d = os.path.join(out, split, f"class_{c:03d}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                path = os.path.join(d, f"{split}_{c:03d}_{i:05d}.jpg")
                render(c, np.random.default_rng([seed, si, c, i]), size).save(path, "JPEG", quality=quality)
                files[split].append((path, c))
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    for k in range(labeled_sets if labeled_per_class else 0):
        split = labeled_split(k)
        files[split] = []
        for c in range(classes):
            d = os.path.join(out, split, f"class_{c:03d}")
            os.makedirs(d, exist_ok=True)
            head = [f for f in files["train"] if f[1] == c][k * labeled_per_class:(k + 1) * labeled_per_class]
            for path, _ in head:
                dst = os.path.join(d, os.path.basename(path))
                shutil.copyfile(path, dst)
                files[split].append((dst, c))
    summary["corrupt"] = []
    summary.update({f"num_{k}": len(v) for k, v in files.items()})
    write_json(os.path.join(out, "synthetic.json"), summary)
    return summary
