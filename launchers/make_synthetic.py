#!/usr/bin/env python3
"""Write a generated labelled JPEG dataset (ImageFolder train/ and val/, optional WebDataset tars).

Two kinds:
  styles (default, usp_scale/data/synthetic.py): each class its own shape, colour and texture (the main job's);
  shapes (usp_scale/data/shapes.py): 10 classes of two shapes in an arrangement, colour, texture, background and
         clutter drawn independently of the class; train/ is the (unlabelled for pretraining) pool, labeled/ its
         first --labeled-per-class images per class, val/ held out (the effect benchmark's).

Examples:
  python launchers/make_synthetic.py --out data/synthetic --classes 10 --per-class 50 --size 64
  python launchers/make_synthetic.py --kind shapes --out data/shapes --per-class 1000 --val-per-class 50 \
      --labeled-per-class 10
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

from usp_scale.data.synthetic import make_synthetic


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (gets train/, val/, synthetic.json, and wds/)")
    p.add_argument("--kind", default="styles", choices=["styles", "shapes"],
                   help="styles: a shape, colour and texture per class (default); shapes: two shapes in an "
                        "arrangement per class, everything else random (usp_scale/data/shapes.py)")
    p.add_argument("--max-rotation", type=float, default=180.0,
                   help="shapes only: glyphs rotate by up to this many degrees either way (default 180: any angle)")
    p.add_argument("--labeled-per-class", type=int, default=10,
                   help="shapes only: images per class copied from the head of train/ to labeled/ (default 10)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10; shapes: always 10)")
    p.add_argument("--per-class", type=int, default=50, help="train images per class (default 50)")
    p.add_argument("--val-per-class", type=int, default=-1, help="val images per class (default per-class/5)")
    p.add_argument("--size", type=int, default=64, help="short image side in pixels (default 64)")
    p.add_argument("--max-aspect", type=float, default=1.0,
                   help="aspect ratios drawn in [1/A, A] (default 1.0: square images)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same arguments give identical files")
    p.add_argument("--tar-shards", type=int, default=0, help="also write K WebDataset tar shards per split to OUT/wds")
    p.add_argument("--corrupt", type=int, default=0, help="truncate K train JPEGs (to test corrupt-file handling)")
    p.add_argument("--quality", type=int, default=92, help="JPEG quality (default 92)")
    a = p.parse_args(argv)
    if a.kind == "shapes":
        bad = [f for f, v, d in (("--classes", a.classes, 10), ("--max-aspect", a.max_aspect, 1.0),
                                 ("--tar-shards", a.tar_shards, 0), ("--corrupt", a.corrupt, 0)) if v != d]
        if bad:
            p.error(f"--kind shapes does not take {', '.join(bad)} (10 classes of square images, ImageFolder only)")
        from usp_scale.data.shapes import make_shapes
        vpc = max(1, a.per_class // 5) if a.val_per_class < 0 else a.val_per_class
        s = make_shapes(a.out, a.per_class, vpc, a.labeled_per_class, a.size, a.seed, a.quality, progress=True,
                        max_rotation=a.max_rotation)
        print(json.dumps({k: v for k, v in s.items() if k != "styles"}))
        return
    s = make_synthetic(a.out, a.classes, a.per_class, a.size, a.val_per_class, a.seed, a.max_aspect, a.tar_shards,
                       a.corrupt, a.quality, progress=True)
    print(json.dumps({k: v for k, v in s.items() if k != "styles"}))


if __name__ == "__main__":
    main()
