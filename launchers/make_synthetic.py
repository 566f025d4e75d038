#!/usr/bin/env python3
"""Write a small synthetic labelled JPEG dataset (ImageFolder train/ and val/, optional WebDataset tars).

Example: python launchers/make_synthetic.py --out data/synthetic --classes 10 --per-class 50 --size 64
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
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
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
    s = make_synthetic(a.out, a.classes, a.per_class, a.size, a.val_per_class, a.seed, a.max_aspect, a.tar_shards,
                       a.corrupt, a.quality, progress=True)
    print(json.dumps({k: v for k, v in s.items() if k != "styles"}))


if __name__ == "__main__":
    main()
