"""A small labelled image dataset of real JPEG files whose classes differ in visible structure.

Class ``c`` fixes a shape (disc, square, triangle, cross, ring, diamond), a colour (hue), and a texture
(plain, stripes, checker); every image varies position, size, rotation, background and noise. All of it
is seeded by (seed, split, class, image), so the files are identical for the same arguments.

Shape ``c % 6`` and texture ``(c + c // 6) % 3`` give every one of the first 18 classes its own
(shape, texture) pair, so each texture appears among the first classes (classes 0, 1, 2 are a plain disc, a
striped square, a checkered triangle); hues follow the golden ratio. Texture periods are 12-18 % of the
image side (8-11 px at 64 px), coarse enough to survive a x8 VAE.
"""
from __future__ import annotations

import colorsys
import io
import json
import math
import os
import tarfile
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw

from ..fileio import write_json
from .shapes import make_shapes

SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond")
TEXTURES = ("plain", "stripes", "checker")


def class_style(c: int) -> dict:
    hue = (c * 0.618033988749895) % 1.0
    return {"shape": SHAPES[c % len(SHAPES)], "texture": TEXTURES[(c + c // len(SHAPES)) % len(TEXTURES)],
            "rgb": tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.85, 0.95))}


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> List[tuple]:
    if shape == "square":
        angles = [rot + math.pi / 4 + k * math.pi / 2 for k in range(4)]
    elif shape == "diamond":
        angles = [rot + k * math.pi / 2 for k in range(4)]
    else:  # triangle
        angles = [rot + k * 2 * math.pi / 3 for k in range(3)]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def render(c: int, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One RGB image of class ``c``."""
    st = class_style(c)
    bg = tuple(int(v) for v in rng.integers(20, 90, 3))
    img = Image.new("RGB", (width, height), bg)
    # texture layer in the class colour, masked by the shape
    tex = Image.new("RGB", (width, height), st["rgb"])
    if st["texture"] != "plain":
        d = ImageDraw.Draw(tex)
        period = max(4, int(min(width, height) * rng.uniform(0.12, 0.18)))
        dark = tuple(v // 3 for v in st["rgb"])
        for k in range(0, max(width, height) * 2, period):
            if st["texture"] == "stripes":
                d.line([(k, 0), (k - height, height)], fill=dark, width=max(1, period // 2))
            else:
                for j in range(0, height, period):
                    if ((k // period) + (j // period)) % 2 == 0 and k < width:
                        d.rectangle([k, j, k + period - 1, j + period - 1], fill=dark)
    mask = Image.new("L", (width, height), 0)
    dm = ImageDraw.Draw(mask)
    s = min(width, height)
    r = s * rng.uniform(0.22, 0.38)
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    rot = rng.uniform(0, 2 * math.pi)
    shape = st["shape"]
    if shape == "disc":
        dm.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        dm.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        dm.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=0)
    elif shape == "cross":
        w = r * 0.35
        for a in (rot, rot + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            dm.polygon([(cx - dx * r + px, cy - dy * r + py), (cx + dx * r + px, cy + dy * r + py),
                        (cx + dx * r - px, cy + dy * r - py), (cx - dx * r - px, cy - dy * r - py)], fill=255)
    else:
        dm.polygon(_polygon(shape, cx, cy, r, rot), fill=255)
    img.paste(tex, (0, 0), mask)
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 6, (height, width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_synthetic(out: str, classes: int = 10, per_class: int = 20, size: int = 64, val_per_class: int = -1,
                   seed: int = 0, max_aspect: float = 1.0, tar_shards: int = 0, corrupt: int = 0,
                   quality: int = 92, progress: bool = False) -> Dict:
    """Write ``out/{train,val}/class_XXX/*.jpg`` (+ ``out/wds/{train,val}/*.tar`` when tar_shards > 0).

    ``max_aspect`` > 1 draws each image's aspect ratio log-uniformly in [1/max_aspect, max_aspect] (short
    side = size). ``corrupt`` truncates that many train JPEGs (for tests of corrupt-file handling).
    Returns a summary (also written to ``out/synthetic.json``).
    """
    if classes < 1 or per_class < 1 or size < 8:
        raise ValueError("need --classes >= 1, --per-class >= 1 and --size >= 8")
    val_per_class = max(1, per_class // 5) if val_per_class < 0 else val_per_class
    summary = {"kind": "styles", "classes": classes, "per_class": per_class, "val_per_class": val_per_class, "size": size,
               "seed": seed, "max_aspect": max_aspect, "styles": [class_style(c) for c in range(classes)]}
    files = {"train": [], "val": []}
    total = classes * (per_class + val_per_class)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="img", desc="synthetic")
    for si, (split, n) in enumerate((("train", per_class), ("val", val_per_class))):
        for c in range(classes):
            d = os.path.join(out, split, f"class_{c:03d}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, si, c, i])
                a = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect))) if max_aspect > 1 else 1.0
                w, h = (int(round(size * a)), size) if a >= 1 else (size, int(round(size / a)))
                path = os.path.join(d, f"{split}_{c:03d}_{i:05d}.jpg")
                render(c, rng, w, h).save(path, "JPEG", quality=quality)
                files[split].append((path, c))
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    bad = []
    if corrupt:
        rng = np.random.default_rng([seed, 99])
        for k in sorted(rng.choice(len(files["train"]), size=min(corrupt, len(files["train"])), replace=False)):
            path = files["train"][k][0]
            data = open(path, "rb").read()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            bad.append(path)
    summary["corrupt"] = bad
    if tar_shards:
        for split in ("train", "val"):
            d = os.path.join(out, "wds", split)
            os.makedirs(d, exist_ok=True)
            items = files[split]
            per = -(-len(items) // tar_shards)
            for k in range(tar_shards):
                chunk = items[k * per:(k + 1) * per]
                if not chunk:
                    continue
                with tarfile.open(os.path.join(d, f"shard-{k:05d}.tar"), "w") as tf:
                    for j, (path, c) in enumerate(chunk):
                        key = f"{k:05d}_{j:06d}"
                        for name, data in ((f"{key}.jpg", open(path, "rb").read()), (f"{key}.cls", str(c).encode())):
                            ti = tarfile.TarInfo(name)
                            ti.size, ti.mtime = len(data), 0
                            tf.addfile(ti, io.BytesIO(data))
    summary["num_train"], summary["num_val"] = len(files["train"]), len(files["val"])
    write_json(os.path.join(out, "synthetic.json"), summary)
    return summary



def add_dataset_args(p, per_class: int = 300, val_per_class: int = 40) -> None:
    """The command-line flags of a launcher that trains on a generated set (made where it is missing)."""
    p.add_argument("--data", default="", help="generated dataset root (made with --kind/--classes/--per-class/--size/"
                   "--data-seed if it holds no synthetic.json; default: a temporary folder)")
    p.add_argument("--kind", default="styles", choices=["styles", "shapes"],
                   help="which generated set: styles = this module's (a shape, colour and texture per class; the "
                        "main job's), shapes = data/shapes.py's (shapes in an arrangement, colour and texture "
                        "random; the effect benchmark's). Default styles")
    p.add_argument("--classes", type=int, default=10, help="classes of the generated dataset (default 10; the shapes "
                   "set always has 10)")
    p.add_argument("--per-class", type=int, default=per_class, help=f"train images per class (default {per_class})")
    p.add_argument("--val-per-class", type=int, default=val_per_class,
                   help=f"val images per class (default {val_per_class})")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated dataset (default 0, as the "
                   "main job's)")


def prepare_dataset(a, prefix: str, progress: bool = True):
    """The dataset named by :func:`add_dataset_args`' flags, made if missing (in a temporary folder without
    ``--data``). Returns (root, the TemporaryDirectory or None, synthetic.json without its per-image lists)."""
    import tempfile

    tmp, data = None, a.data
    if not data:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        data = tmp.name
    kind = getattr(a, "kind", "styles")
    if kind == "shapes" and a.classes != 10:
        raise ValueError(f"--kind shapes has 10 classes; --classes {a.classes} cannot be made")
    if not os.path.isfile(os.path.join(data, "synthetic.json")):
        if kind == "shapes":
            make_shapes(data, a.per_class, a.val_per_class, 0, a.size, a.data_seed, progress=progress)
        else:
            make_synthetic(data, a.classes, a.per_class, a.size, a.val_per_class, a.data_seed, progress=progress)
    with open(os.path.join(data, "synthetic.json")) as f:
        info = {k: v for k, v in json.load(f).items() if k not in ("styles", "corrupt")}
    got = info.get("kind", "styles")
    if got != kind:
        raise ValueError(f"{data}/synthetic.json describes a {got!r} set, not the --kind {kind} asked for; give "
                         f"--kind {got} or another --data folder")
    return data, tmp, info

def load_split(root: str, split: str) -> tuple:
    """All images of ``root/split/class_XXX/*.jpg`` as (uint8 (N, H, W, 3), int64 (N,) labels), sorted by class
    folder then file name; every image must have the same size (square synthetic sets). For the small trained
    components (VAE, feature extractor) that train on the whole split in memory."""
    d = os.path.join(root, split)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"no split folder {d}; make the dataset with `python launchers/make_synthetic.py "
                                f"--out {root}`")
    classes = sorted(c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c)))
    ims, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(d, c))):
            if f.lower().endswith((".jpg", ".jpeg", ".png")):
                with Image.open(os.path.join(d, c, f)) as im:
                    ims.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
                labels.append(ci)
    if not ims:
        raise FileNotFoundError(f"no images under {d}")
    shapes = {a.shape for a in ims}
    if len(shapes) != 1:
        raise ValueError(f"{d}: images of different sizes {sorted(shapes)[:4]}; load_split needs one size "
                         "(make the set with --max-aspect 1)")
    return np.stack(ims), np.asarray(labels, dtype=np.int64)
