"""The shapes task (usp_scale/data/shapes.py, make_synthetic.py --kind shapes): layout, determinism, disjoint
labelled sets, and what makes it a test of representation: colour statistics that separate the old set's classes
say nothing about these."""
import hashlib
import os
import runpy
import sys

import numpy as np
import pytest
from PIL import Image

from _helpers_data import REPO


def _run(args):
    old = sys.argv
    sys.argv = ["make_synthetic.py"] + args
    try:
        runpy.run_path(os.path.join(REPO, "launchers", "make_synthetic.py"), run_name="__main__")
    finally:
        sys.argv = old


def _files(root, split):
    out = []
    for d, _, files in sorted(os.walk(os.path.join(root, split))):
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".jpg")]
    return out


def _digest(paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(open(p, "rb").read())
    return h.hexdigest()


def test_layout_determinism_and_labelled_sets(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    args = ["--kind", "shapes", "--per-class", "6", "--val-per-class", "2", "--labeled-per-class", "2", "--size", "32"]
    _run(["--out", a] + args)
    _run(["--out", b] + args)
    _run(["--out", c] + args + ["--seed", "1"])
    assert sorted(os.listdir(os.path.join(a, "train"))) == [f"class_{k:03d}" for k in range(10)]
    assert len(_files(a, "train")) == 60 and len(_files(a, "val")) == 20 and len(_files(a, "labeled")) == 20
    assert _digest(_files(a, "train") + _files(a, "val")) == _digest(_files(b, "train") + _files(b, "val"))
    assert _digest(_files(a, "train")) != _digest(_files(c, "train"))
    # labelled set 0 = the first 2 pool images of each class, byte for byte
    for p in _files(a, "labeled"):
        cls, name = p.split(os.sep)[-2:]
        assert int(name.split("_")[2].split(".")[0]) < 2
        assert open(p, "rb").read() == open(os.path.join(a, "train", cls, name), "rb").read()

    from usp_scale.data.shapes import labeled_split, make_shapes
    info = make_shapes(str(tmp_path / "d"), per_class=7, val_per_class=1, labeled_per_class=2, size=32,
                       labeled_sets=3)
    assert info["num_labeled"] == info["num_labeled_1"] == info["num_labeled_2"] == 20
    sets = [{os.path.basename(p) for p in _files(str(tmp_path / "d"), labeled_split(k))} for k in range(3)]
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2]) and not (sets[0] & sets[2])
    # a larger pool extends a smaller one image for image
    assert _digest(_files(str(tmp_path / "d"), "train")[:6]) == _digest(_files(a, "train")[:6])
    with pytest.raises(ValueError, match="labeled_per_class=3 x labeled_sets=3"):
        make_shapes(str(tmp_path / "e"), per_class=8, labeled_per_class=3, labeled_sets=3, size=32)
    with pytest.raises(SystemExit):
        _run(["--out", str(tmp_path / "f"), "--kind", "shapes", "--classes", "5", "--size", "32"])


def _colour_features(paths):
    """Per image: mean and std of R, G, B and a 4x4x4 colour histogram; what separates the old set's classes."""
    xs = []
    for p in paths:
        x = np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3).astype(float)
        hist = np.histogramdd(x, bins=(4, 4, 4), range=[(0, 256)] * 3)[0].ravel() / len(x)
        xs.append(np.concatenate([x.mean(0) / 255, x.std(0) / 255, hist]))
    return np.array(xs)


def _nearest_centroid(root, classes):
    def split(s):
        paths = _files(root, s)
        return _colour_features(paths), np.array([int(p.split(os.sep)[-2][6:]) for p in paths])

    xtr, ytr = split("train")
    xva, yva = split("val")
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    cent = np.stack([xtr[ytr == c].mean(0) for c in range(classes)])
    return float((np.argmin(((xva[:, None] - cent[None]) ** 2).sum(-1), 1) == yva).mean())


def test_colour_statistics_do_not_tell_the_classes_apart(tmp_path):
    """The shapes classes are defined by shape and arrangement only: a nearest-centroid classifier on colour
    statistics is near chance (10 %) on them, while the same classifier reads the old set's classes off easily."""
    from usp_scale.data.shapes import make_shapes
    from usp_scale.data.synthetic import make_synthetic

    make_shapes(str(tmp_path / "shapes"), per_class=40, val_per_class=20, labeled_per_class=0, size=32)
    make_synthetic(str(tmp_path / "styles"), classes=10, per_class=40, size=32, val_per_class=20, seed=0)
    shapes = _nearest_centroid(str(tmp_path / "shapes"), 10)
    styles = _nearest_centroid(str(tmp_path / "styles"), 10)
    assert shapes < 0.2, shapes          # chance 0.1; 200 val images
    assert styles > 0.8, styles


def test_glyphs_differ_by_shape_and_arrangement_and_render_inside_the_image():
    from usp_scale.data.shapes import GLYPHS, _glyph_mask, class_spec, render

    assert len(set(GLYPHS)) == 10 and class_spec(7) == {"glyph": "tee"}
    with pytest.raises(ValueError, match="10 classes"):
        class_spec(10)
    # plus, tee and ell: the same two bars in three arrangements (equal area up to the overlap), all distinct
    masks = {g: np.asarray(_glyph_mask(g, 64, 64, 32, 32, 20, 0.0, False)) > 0 for g in GLYPHS}
    for a, b in (("plus", "tee"), ("tee", "ell"), ("disc", "ring"), ("square", "frame"), ("disc", "pair")):
        assert (masks[a] != masks[b]).mean() > 0.02, (a, b)
    assert masks["ring"].sum() < masks["disc"].sum() and masks["frame"].sum() < masks["square"].sum()
    # a mirrored ell is a different mask (the class holds both, like the flips of training)
    assert (np.asarray(_glyph_mask("ell", 64, 64, 32, 32, 20, 0.0, True)) != masks["ell"] * 255).any()
    for c in range(10):
        im = render(c, np.random.default_rng([5, c]), 48)
        assert im.size == (48, 48) and im.mode == "RGB"
