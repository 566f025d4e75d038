"""Map-style image datasets: ImageFolder layout and WebDataset tar shards.

Both index their files once (no decoding) and expose ``samples`` as a list of
:class:`Record` (an identifier used in reports, a label, and how to fetch the bytes). A
corrupt or truncated image does not stop the run: :meth:`ImageDataset.load` returns ``None``
and the caller counts and reports it by path (``strict=True`` raises :class:`CorruptImageError`).
"""
from __future__ import annotations

import io
import os
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Tuple

from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

# torchvision's ImageFolder extensions (its constant, so the two read the same files; matched case-insensitively)
IMAGE_EXTS = tuple(IMG_EXTENSIONS)
# WebDataset member extensions that hold an image, in order of preference.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# compressed shards (WebDataset also reads them) -> the command that decompresses them in place (TarDataset refuses
# them with it)
COMPRESSED_TAR_EXTS = {".tar.gz": "gunzip", ".tgz": "gunzip", ".tar.bz2": "bunzip2", ".tar.xz": "unxz",
                       ".tar.zst": "unzstd --rm"}


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used (missing, empty, malformed)."""


class CorruptImageError(RuntimeError):
    """An image that cannot be decoded while ``strict`` is set."""


@dataclass
class Record:
    """One sample: ``path`` names it in reports (a file, or ``tar::member``)."""
    path: str
    label: int
    tar: str = ""          # tar file holding the bytes ("" = a plain file)
    offset: int = 0        # byte offset of the member's data inside ``tar``
    size: int = 0          # member size in bytes


def decode_rgb(data_or_path) -> Image.Image:
    """Decode fully into an RGB PIL image (raises on truncated/corrupt input)."""
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, (bytes, bytearray)) else data_or_path
    with Image.open(src) as im:
        return im.convert("RGB")  # convert() forces the full decode, so truncation surfaces here


DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageDataset:
    """Base class: ``samples``, ``classes``, :meth:`read_bytes`, :meth:`load`."""

    samples: List[Record]
    classes: List[str]
    root: str
    # How a corrupt image under strict=True is explained: the switch of whoever reads the dataset (the cache
    # writer replaces it with its --strict flag).
    strict_hint = "data.strict=true makes this an error; set data.strict=false to skip and report such files"

    def __len__(self) -> int:
        return len(self.samples)

    def read_bytes(self, i: int) -> bytes:
        r = self.samples[i]
        if r.tar:
            # one open handle per tar and process (workers are forked: key the cache by pid)
            cache = self.__dict__.setdefault("_handles", {})
            key = (os.getpid(), r.tar)
            f = cache.get(key)
            if f is None:
                f = cache[key] = open(r.tar, "rb")
            f.seek(r.offset)
            return f.read(r.size)
        with open(r.path, "rb") as f:
            return f.read()

    def __getstate__(self):  # open tar handles stay in their process
        return {k: v for k, v in self.__dict__.items() if k != "_handles"}

    def load(self, i: int, strict: bool = False) -> Tuple[Optional[Image.Image], int, str]:
        """(RGB image or None if corrupt, label, error message or "")."""
        r = self.samples[i]
        try:
            return decode_rgb(self.read_bytes(i)), r.label, ""
        except DECODE_ERRORS as e:
            msg = f"{type(e).__name__}: {e}"
            if strict:
                raise CorruptImageError(f"corrupt image {r.path}: {msg} ({self.strict_hint})") from e
            return None, r.label, msg

    @property
    def labels(self) -> List[int]:
        return [r.label for r in self.samples]


def split_dir(root: str, split: str) -> str:
    """``root/split`` (or ``root`` when split is ""), which must be an existing folder."""
    if not root:
        raise DatasetError("data.root is empty: set it to a dataset folder (ImageFolder layout with train/ and val/, "
                           "or a folder of WebDataset .tar shards); `python launchers/make_synthetic.py --out DIR` "
                           "writes a small one")
    path = os.path.join(root, split) if split else root
    if not os.path.isdir(path):
        raise DatasetError(f"dataset folder not found: {path} (data.root={root!r}, split={split!r})")
    return path


class ImageFolderDataset(ImageDataset):
    """``root/split/<class>/.../<image>`` read by torchvision's ``ImageFolder`` rules: the classes are the sub-folders
    sorted by name (labels 0..K-1), each class's files are found recursively (following links) in sorted order, and
    a file is an image when its name ends (any case) in one of torchvision's extensions (:data:`IMAGE_EXTS`), so the
    samples and labels equal ``torchvision.datasets.ImageFolder``'s (tests/test_data_datasets.py compares them).
    Files in class folders with other extensions are left out as torchvision leaves them out, but not silently: one
    warning counts them by extension and names an example (hidden files such as ``.DS_Store`` are not counted)."""

    def __init__(self, root: str, split: str = "train"):
        self.root = split_dir(root, split)
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise DatasetError(f"no class folders in {self.root}: expected one sub-folder per class "
                               f"holding {'/'.join(IMAGE_EXTS)} files")
        self.samples = []
        skipped: Counter = Counter()
        example = {}
        for label, c in enumerate(self.classes):
            cdir = os.path.join(self.root, c)
            n = len(self.samples)
            for folder, _, names in sorted(os.walk(cdir, followlinks=True)):
                for f in sorted(names):
                    path = os.path.join(folder, f)
                    if f.lower().endswith(IMAGE_EXTS):
                        self.samples.append(Record(path, label))
                    elif not f.startswith("."):
                        ext = os.path.splitext(f)[1].lower() or "(no extension)"
                        skipped[ext] += 1
                        example.setdefault(ext, path)
            if len(self.samples) == n:
                raise DatasetError(f"class folder {cdir} holds no images ({'/'.join(IMAGE_EXTS)}, searched "
                                   "recursively as torchvision's ImageFolder does)")
        if skipped:
            what = ", ".join(f"{n} x {e} (e.g. {example[e]})" for e, n in sorted(skipped.items()))
            warnings.warn(f"{self.root}: files in class folders that are not read (not one of torchvision "
                          f"ImageFolder's extensions {'/'.join(IMAGE_EXTS)}; torchvision skips them too): {what}. "
                          "Convert them (e.g. to .png) to train on them", stacklevel=2)


class TarDataset(ImageDataset):
    """WebDataset shards: ``*.tar`` under ``root/split`` (or root); members ``KEY.jpg|png`` + ``KEY.cls``.

    The key is the member path up to the first dot of its basename (WebDataset convention). The
    shards are indexed once (offsets of the image bytes), then read with random access.
    """

    def __init__(self, root: str, split: str = "train"):
        path = split_dir(root, split) if split and os.path.isdir(os.path.join(root, split)) else split_dir(root, "")
        self.root = path
        names = os.listdir(path)
        packed = sorted(f for f in names if f.endswith(tuple(COMPRESSED_TAR_EXTS)))
        if packed:
            shown = ", ".join(packed[:3]) + (f" and {len(packed) - 3} more" if len(packed) > 3 else "")
            kinds = sorted({e for f in packed for e in COMPRESSED_TAR_EXTS if f.endswith(e)})
            how = " && ".join(f"{COMPRESSED_TAR_EXTS[e]} *{e}" for e in kinds)
            raise DatasetError(
                f"{path}: compressed tar shards ({shown}) are not read: the loaders read each sample at its byte "
                "offset in the shard (every rank its own samples of a globally shuffled epoch, and an exact resume), "
                "which a compressed stream cannot give without decompressing from its start. Decompress them once, "
                f"in place: `cd {path} && {how}` (each shard becomes the same name ending in .tar: the same "
                "samples for WebDataset; image members hardly compress, so it is about as large)")
        tars = sorted(os.path.join(path, f) for f in names if f.endswith(".tar"))
        if not tars:
            raise DatasetError(f"no .tar shards in {path} (data.format=wds expects WebDataset tar files)")
        self.samples = []
        labels_seen = set()
        for t in tars:
            for rec in self._index(t):
                self.samples.append(rec)
                labels_seen.add(rec.label)
        if not self.samples:
            raise DatasetError(f"the .tar shards in {path} hold no image+.cls pairs")
        self.classes = [str(i) for i in range(max(labels_seen) + 1)]
        self.tars = tars

    @staticmethod
    def _index(tar_path: str) -> List[Record]:
        groups: dict = {}
        try:
            with tarfile.open(tar_path, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    d, base = os.path.split(m.name)
                    if "." not in base:
                        continue
                    key, ext = base.split(".", 1)
                    g = groups.setdefault(os.path.join(d, key), {})
                    ext = ext.lower()
                    if ext == "cls":
                        g["cls"] = tf.extractfile(m).read().decode().strip()
                    elif ext in WDS_IMAGE_EXTS:
                        g["img"] = (m.offset_data, m.size, m.name)
        except tarfile.TarError as e:
            raise DatasetError(f"cannot read tar shard {tar_path}: {e}") from e
        out = []
        for key in sorted(groups):
            g = groups[key]
            if "img" not in g:
                continue
            if "cls" not in g:
                raise DatasetError(f"{tar_path}: sample {key!r} has an image but no .cls label member")
            try:
                label = int(g["cls"])
            except ValueError as e:
                raise DatasetError(f"{tar_path}: {key}.cls holds {g['cls']!r}, not an integer class id") from e
            off, size, name = g["img"]
            out.append(Record(f"{tar_path}::{name}", label, tar=tar_path, offset=off, size=size))
        return out


def build_dataset(root: str, split: str, fmt: str = "folder") -> ImageDataset:
    """``fmt`` is "folder" or "wds"."""
    if fmt == "folder":
        return ImageFolderDataset(root, split)
    if fmt == "wds":
        return TarDataset(root, split)
    raise DatasetError(f"data.format={fmt!r} is not an image format; use 'folder' or 'wds' "
                       "('latents' reads a cache, 'synthetic' draws random latents)")
