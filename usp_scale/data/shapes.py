"""A synthetic benchmark task where the representation matters by construction: classes are shapes.

Every image holds one large object, the glyph, and clutter. The class is the glyph, and a glyph is a shape or a
spatial arrangement of parts: disc, ring (a disc with a hole), square, frame (a square with a hole), triangle,
bar, plus (two bars crossing at their middles), tee (one bar ending at the other's middle), ell (two bars meeting
at their ends) and pair (two discs side by side). Plus, tee and ell are the same two bars arranged differently;
disc and pair the same disc once or twice; ring and frame differ from disc and square by a hole. Everything else
is drawn independently of the class, per image: the glyph's colour and texture (plain, stripes, checker, in random
colours, kept apart from the background under it), its size, rotation (any angle, or up to ``max_rotation`` degrees), mirror image and position, the
background (a random two-colour gradient, sometimes textured), and the clutter (up to three strokes and small
squares, drawn behind or over the glyph, so they occlude it). Colour and texture statistics therefore say nothing
about the class (a classifier on them is at chance, ``tests/test_data_shapes.py``), which is what made the old set
(``data/synthetic.py``, one colour and texture per class) easy for a random encoder.

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
GLYPHS = ("disc", "ring", "square", "frame", "triangle", "bar", "plus", "tee", "ell", "pair")
SPLITS = ("train", "val")          # drawn splits; labeled/ copies the head of train/


def class_spec(c: int) -> dict:
    """What defines class ``c``: its glyph."""
    if not 0 <= c < len(GLYPHS):
        raise ValueError(f"the shapes task has {len(GLYPHS)} classes (0..{len(GLYPHS) - 1}), not class {c}")
    return {"glyph": GLYPHS[c]}


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


# Glyphs in their own frame (units of the radius r, centred on 0, y down): filled polygons and circles, then holes.
def _bar(x0, y0, x1, y1, half_w):
    """The rectangle of half-width ``half_w`` around the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    n = math.hypot(dx, dy) or 1.0
    px, py = -dy / n * half_w, dx / n * half_w
    return [(x0 + px, y0 + py), (x1 + px, y1 + py), (x1 - px, y1 - py), (x0 - px, y0 - py)]


_W = 0.28   # half-width of the bars of bar / plus / tee / ell
_PARTS = {  # glyph -> (polygons, circles (x, y, radius), holes: polygons, hole circles)
    "disc": ([], [(0, 0, 1.0)], [], []),
    "ring": ([], [(0, 0, 1.0)], [], [(0, 0, 0.5)]),
    "square": ([[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]], [], [], []),
    "frame": ([[(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]], [],
              [[(-0.45, -0.45), (0.45, -0.45), (0.45, 0.45), (-0.45, 0.45)]], []),
    "triangle": ([[(1.1 * math.cos(a), 1.1 * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]],
                 [], [], []),
    "bar": ([_bar(-1.05, 0, 1.05, 0, _W + 0.05)], [], [], []),
    "plus": ([_bar(-1, 0, 1, 0, _W), _bar(0, -1, 0, 1, _W)], [], [], []),
    "tee": ([_bar(-1, -0.7, 1, -0.7, _W), _bar(0, -0.7, 0, 1, _W)], [], [], []),
    "ell": ([_bar(-0.6, -1, -0.6, 0.9, _W), _bar(-0.6, 0.9, 1, 0.9, _W)], [], [], []),
    "pair": ([], [(-0.55, 0, 0.45), (0.55, 0, 0.45)], [], []),
}


def _glyph_mask(glyph: str, w: int, h: int, cx: float, cy: float, r: float, rot: float,
                mirror: bool) -> Image.Image:
    """An L mask of ``glyph`` of radius ``r`` (its extent from the centre) at (cx, cy), rotated by ``rot``."""
    if glyph not in _PARTS:
        raise ValueError(f"unknown glyph {glyph!r}; glyphs: {', '.join(GLYPHS)}")
    polys, circles, holes, hole_circles = _PARTS[glyph]
    cs, sn, fx = math.cos(rot), math.sin(rot), -1.0 if mirror else 1.0

    def tf(x, y):
        x *= fx
        return cx + r * (x * cs - y * sn), cy + r * (x * sn + y * cs)

    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    for fill, ps, cl in ((255, polys, circles), (0, holes, hole_circles)):
        for poly in ps:
            d.polygon([tf(x, y) for x, y in poly], fill=fill)
        for x, y, rr in cl:
            ox, oy = tf(x, y)
            d.ellipse([ox - rr * r, oy - rr * r, ox + rr * r, oy + rr * r], fill=fill)
    return m


def _clutter(img: Image.Image, rng: np.random.Generator, n: int) -> None:
    """``n`` distractors: strokes across the image and small squares, in random colours."""
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


def render(c: int, rng: np.random.Generator, size: int, max_rotation: float = 180.0) -> Image.Image:
    """One RGB image (size x size) of class ``c``, the glyph rotated by up to ``max_rotation`` degrees either way."""
    glyph = class_spec(c)["glyph"]
    w = h = size
    # background: a gradient between two random colours, textured one time in three
    c0, c1 = np.array(_rgb(rng, v=(0.2, 0.9))), np.array(_rgb(rng, v=(0.2, 0.9)))
    ga = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w] / max(size - 1, 1)
    t = ((xx - 0.5) * math.cos(ga) + (yy - 0.5) * math.sin(ga)) / 1.42 + 0.5
    img = Image.fromarray((c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.uint8))
    if rng.uniform() < 1 / 3:
        kind = ("stripes", "checker")[int(rng.integers(0, 2))]
        img = Image.blend(img, _texture(rng, w, h, _rgb(rng), kind), 0.25)
    n_clutter = int(rng.integers(0, 4))
    n_behind = int(rng.integers(0, n_clutter + 1))
    _clutter(img, rng, n_behind)
    # the glyph: size, position (inside the image), rotation, mirror image, colour (apart from the background
    # under it) and texture
    r = size * rng.uniform(0.24, 0.34)
    ext = 1.1 * r
    cx, cy = rng.uniform(ext, w - ext), rng.uniform(ext, h - ext)
    rot = math.radians(rng.uniform(-max_rotation, max_rotation))
    mask = _glyph_mask(glyph, w, h, cx, cy, r, rot, bool(rng.integers(0, 2)))
    kind = ("plain", "plain", "stripes", "checker")[int(rng.integers(0, 4))]
    under = np.asarray(img.getpixel((int(cx), int(cy))), float)
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
                labeled_sets: int = 1, max_rotation: float = 180.0) -> Dict:
    """Write ``out/{train,labeled,val}/class_XXX/*.jpg`` and ``out/synthetic.json`` (the summary, returned).
    ``max_rotation``: glyphs are rotated by up to this many degrees either way (180: any angle)."""
    classes = len(GLYPHS)
    if per_class < 1 or val_per_class < 1 or size < 16:
        raise ValueError("the shapes task needs per_class >= 1, val_per_class >= 1 and size >= 16")
    if labeled_sets < 1 or not 0 <= labeled_per_class * labeled_sets <= per_class:
        raise ValueError(f"labeled_per_class={labeled_per_class} x labeled_sets={labeled_sets} must lie in "
                         f"0..per_class={per_class} (the labelled sets are disjoint groups at the head of the train "
                         "pool)")
    summary = {"kind": KIND, "classes": classes, "per_class": per_class, "val_per_class": val_per_class,
               "labeled_per_class": labeled_per_class, "labeled_sets": labeled_sets, "max_rotation": max_rotation,
               "size": size, "seed": seed, "max_aspect": 1.0,
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
                render(c, np.random.default_rng([seed, si, c, i]), size, max_rotation).save(path, "JPEG",
                                                                                          quality=quality)
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
