"""Small trained components shipped inside the package (weights + the record of how they were made).

Layout: ``usp_scale/assets/<kind>/<name>/`` holds the weights and ``asset.json``, which records the command
that made them, the seed, the sha256 of every weights file and the measured quality (see each folder's
README.md). Kinds: ``vae`` (diffusers AutoencoderKL folders, ``vae.path=<name>``) and ``extractor``
(feature extractors for the metrics of the small runs). Nothing here imports the rest of the library but its
file helpers (:mod:`usp_scale.fileio`, a leaf).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

from ..fileio import sha256_file

ROOT = os.path.dirname(os.path.abspath(__file__))
META = "asset.json"


class AssetError(ValueError):
    """A shipped asset that is missing, incomplete or whose weights do not match their recorded hash."""


def names(kind: str) -> List[str]:
    """Shipped asset names of ``kind`` (folders holding an asset.json)."""
    d = os.path.join(ROOT, kind)
    if not os.path.isdir(d):
        return []
    return sorted(n for n in os.listdir(d) if os.path.isfile(os.path.join(d, n, META)))


def is_asset(kind: str, name: str) -> bool:
    """``name`` is a bare shipped name of ``kind`` (not a path)."""
    return bool(name) and os.sep not in name and "/" not in name and name in names(kind)


def asset_dir(kind: str, name: str) -> str:
    if not is_asset(kind, name):
        raise AssetError(f"no shipped {kind} named {name!r}; shipped: {names(kind) or 'none'} "
                         f"(folders under {os.path.join(ROOT, kind)} with an {META})")
    return os.path.join(ROOT, kind, name)


def read_meta(kind: str, name: str) -> Dict:
    with open(os.path.join(asset_dir(kind, name), META)) as f:
        return json.load(f)


def verified_dir(kind: str, name: str) -> str:
    """The asset folder, after checking every weights file against the sha256 recorded in asset.json."""
    d = asset_dir(kind, name)
    meta = read_meta(kind, name)
    for fname, want in meta.get("sha256", {}).items():
        p = os.path.join(d, fname)
        if not os.path.isfile(p):
            raise AssetError(f"{p} is missing (recorded in {os.path.join(d, META)})")
        got = sha256_file(p)
        if got != want:
            raise AssetError(f"{p}: sha256 {got} differs from {want} recorded in {os.path.join(d, META)}; the "
                             f"weights were changed without re-recording them. Retrain with the command in "
                             f"{META} ('command'), which rewrites both, or restore the file from git.")
    return d


def write_meta(folder: str, meta: Dict, weight_files: List[str]) -> Dict:
    """Write ``folder/asset.json``: ``meta`` plus the sha256 of each of ``weight_files`` (names in folder)."""
    meta = dict(meta, sha256={f: sha256_file(os.path.join(folder, f)) for f in weight_files})
    with open(os.path.join(folder, META), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return meta
