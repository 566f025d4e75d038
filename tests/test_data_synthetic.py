"""launchers/make_synthetic.py: layout, determinism, tar shards, corrupt files, learnable classes."""
import hashlib
import os
import runpy
import sys
import tarfile

import numpy as np
from PIL import Image

from _helpers_data import REPO


def _run(args):
    old = sys.argv
    sys.argv = ["make_synthetic.py"] + args
    try:
        runpy.run_path(os.path.join(REPO, "launchers", "make_synthetic.py"), run_name="__main__")
    finally:
        sys.argv = old


def _digest(root):
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith(".jpg"):
                h.update(open(os.path.join(d, f), "rb").read())
    return h.hexdigest()


def test_layout_determinism_tars_and_corrupt(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    _run(["--out", a, "--classes", "3", "--per-class", "4", "--size", "32", "--tar-shards", "2", "--corrupt", "1"])
    _run(["--out", b, "--classes", "3", "--per-class", "4", "--size", "32", "--tar-shards", "2", "--corrupt", "1"])
    _run(["--out", c, "--classes", "3", "--per-class", "4", "--size", "32", "--seed", "1"])
    assert sorted(os.listdir(os.path.join(a, "train"))) == ["class_000", "class_001", "class_002"]
    assert sum(len(os.listdir(os.path.join(a, "train", d))) for d in os.listdir(os.path.join(a, "train"))) == 12
    assert sum(len(os.listdir(os.path.join(a, "val", d))) for d in os.listdir(os.path.join(a, "val"))) == 3
    assert _digest(a) == _digest(b) != _digest(c)
    names = []
    for t in sorted(os.listdir(os.path.join(a, "wds", "train"))):
        with tarfile.open(os.path.join(a, "wds", "train", t)) as tf:
            names += tf.getnames()
    assert len([n for n in names if n.endswith(".jpg")]) == 12 and len([n for n in names if n.endswith(".cls")]) == 12
    bad = 0
    for d, _, files in os.walk(os.path.join(a, "train")):
        for f in files:
            try:
                Image.open(os.path.join(d, f)).convert("RGB")
            except OSError:
                bad += 1
    assert bad == 1


def test_classes_are_learnable_by_a_nearest_centroid_on_colour_histograms(tmp_path):
    from usp_scale.data.synthetic import make_synthetic
    root = str(tmp_path / "s")
    make_synthetic(root, classes=8, per_class=10, size=48, val_per_class=5, seed=2, max_aspect=1.3)

    def feats(split):
        xs, ys = [], []
        for c in range(8):
            d = os.path.join(root, split, f"class_{c:03d}")
            for f in sorted(os.listdir(d)):
                # hue histogram of the bright, saturated (foreground) pixels; the background is dim and random
                hsv = np.asarray(Image.open(os.path.join(d, f)).convert("HSV")).reshape(-1, 3).astype(int)
                fg = hsv[(hsv[:, 1] > 128) & (hsv[:, 2] > 120)]
                hist = np.bincount(fg[:, 0] * 24 // 256, minlength=24).astype(float)
                xs.append(hist / max(hist.sum(), 1))
                ys.append(c)
        return np.array(xs), np.array(ys)

    xtr, ytr = feats("train")
    xva, yva = feats("val")
    cent = np.stack([xtr[ytr == c].mean(0) for c in range(8)])
    pred = np.argmin(((xva[:, None] - cent[None]) ** 2).sum(-1), 1)
    assert (pred == yva).mean() >= 0.9  # chance is 0.125
