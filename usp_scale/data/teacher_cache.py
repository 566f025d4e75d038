"""The teacher-feature cache: REPA's teacher targets (patch tokens of every cached crop, plain and flipped) written
once **beside a latent cache** and read record for record with it -- the cached alternative to running the teacher
online every step (docs/method.md §9 prices both). Same discipline as the latent cache
(:mod:`usp_scale.data.cache_format`, :mod:`usp_scale.data.cache_reader`): per-record CRC-32, shard sidecars, a manifest
with its own hash, a resumable writer sharded over ranks, a memory-mapped reader that verifies what it reads.

It is tied to its latent cache by content, not by path: the **crop set** (the latent cache's source count, shard
size, views, seed, resolution, augmentation, loader and, per shard, the count and CRC of its source-index array
and the fingerprint of its source files) is recorded, and a reader checked against another latent cache -- other
crops, other images, other corrupt-file drops -- refuses by name. Record ``(position, view, flip)`` here is the teacher's output on exactly the crop whose
latent is record ``(position, view, flip)`` there. The **teacher** is recorded by its content fingerprint
(architecture, preprocessing and every weight: :meth:`usp_scale.models.teacher.FrozenTeacher.content_fingerprint`).

Layout of a cache folder::

    manifest.json             format, version, teacher identity, crop set, tokens, dim, per shard size/sha256/header
                              sha256/array CRCs; a sha256 of its own content
    shard_000000.safetensors  features: (n, K, F, T, D) bf16 (view k, flip f: 0 plain, 1 flipped; F = 2 when the
                              latent cache has flips), index: (n,) int64 source positions, crc: (n, K, F) CRC-32
    shard_000000.json         sidecar: count, checksums, settings (the writer skips a shard whose sidecar matches)

The data path knows nothing of models: the writer takes any teacher object with ``identity()``, ``image_size``,
``num_tokens``, ``dim`` and ``from_unit_range(images in [-1, 1]) -> (N, T, D)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from typing import Optional

import numpy as np
import torch

from ..checkpoint.safe_load import CheckpointFileError, read_checked_json, read_json, write_checked_json
from ..fileio import atomic_write
from .cache_format import (LatentCacheError, changed_sources, header_bytes, settings_sha, sha256_file, shard_name,
                           store_np)
from .cache_reader import VERIFY, LatentCache, _nonfinite_rows, _open_safetensors, shard_content_problem
from .loaders import _BatchTask
from .transforms import build_transform

FORMAT = "usp_scale.teacher_cache"
VERSION = 1
ARRAYS = ("index", "crc")
_WHAT = "teacher-feature cache shard"


class TeacherCacheError(LatentCacheError):
    """A teacher-feature cache that does not match the request, or is incomplete or damaged."""


def crop_set(latent_manifest: dict) -> dict:
    """The identity of a latent cache's crops (no VAE, no storage dtype): what a teacher cache must share."""
    m = latent_manifest
    return {"num_source_images": m["num_source_images"], "shard_size": m["shard_size"], "views": m["views"],
            "seed": m["seed"], "resolution": m["resolution"], "augment": m["augment"], "loader": m["loader"],
            "flips": bool(m.get("flips", True)), "num_classes": m["dataset"]["num_classes"],
            "shards": [[sh["count"], sh["arrays_crc32"]["index"]] + ([sh["sources"]["sha256"]] if sh.get("sources")
                                                                         else []) for sh in m["shards"]]}


def record_crcs(features: np.ndarray) -> np.ndarray:
    """CRC-32 of each record (leading index) of a C-contiguous storage array -> (n,) uint32."""
    flat = features.reshape(len(features), -1)
    return np.fromiter((zlib.crc32(r) for r in flat), np.uint32, len(flat))


def _shard_done(out_dir: str, s: int, settings: dict) -> bool:
    side = os.path.join(out_dir, shard_name(s) + ".json")
    final = os.path.join(out_dir, shard_name(s) + ".safetensors")
    if not (os.path.isfile(side) and os.path.isfile(final)):
        return False
    try:
        meta = read_checked_json(side, what="teacher-feature cache shard sidecar")
    except CheckpointFileError:
        return False   # damaged sidecar: the shard is written again
    if meta["settings"] != settings:
        diff = [k for k in settings if meta["settings"].get(k) != settings[k]]
        raise TeacherCacheError(f"{side} was written with different settings ({', '.join(diff)} differ: another "
                                f"teacher or another latent cache's crops); use a new output folder or delete the "
                                f"old shards")
    return os.path.getsize(final) == meta["bytes"] and sha256_file(final) == meta["sha256"]


def _write_shard(out_dir: str, s: int, features: torch.Tensor, index: np.ndarray, settings: dict) -> None:
    from safetensors.torch import save_file

    n, k, f = features.shape[:3]
    crc = record_crcs(store_np(features).reshape(n * k * f, -1))
    sd = {"features": features.contiguous(), "index": torch.from_numpy(np.array(index, np.int64)),
          "crc": torch.from_numpy(crc.view(np.int32).reshape(n, k, f).copy())}
    name = shard_name(s)
    final = os.path.join(out_dir, name + ".safetensors")
    # one metadata key (safetensors writes a multi-key map in a random order): ties the shard to its place and settings
    ident = json.dumps({"format": FORMAT, "version": VERSION, "shard": s, "settings": settings_sha(settings)},
                       sort_keys=True)
    with atomic_write(final, needed=sum(t.numel() * t.element_size() for t in sd.values())) as tmp:
        save_file(sd, tmp, metadata={"usp_scale": ident})
    write_checked_json(os.path.join(out_dir, name + ".json"),
                       {"file": name + ".safetensors", "shard": s, "count": int(n), "sha256": sha256_file(final),
                        "bytes": os.path.getsize(final),
                        "header_sha256": hashlib.sha256(header_bytes(final, _WHAT)).hexdigest(),
                        "arrays_crc32": {a: zlib.crc32(store_np(sd[a])) for a in ARRAYS}, "settings": settings})


def _check_sources(dataset, m: dict, s: int, latent_cache: str) -> None:
    """The files of latent shard ``s`` must be the ones it encoded (its per-shard source fingerprint: path, size and
    modification time of each file; latent caches written before it was recorded are not checked): the same size and
    labels are not enough, a replaced image would get another image's teacher tokens."""
    lo, hi = s * m["shard_size"], min((s + 1) * m["shard_size"], len(dataset))
    paths = [dataset.samples[i].path for i in range(lo, hi)] if hasattr(dataset, "samples") else None
    named = changed_sources(paths, m["shards"][s].get("sources")) if paths is not None else ""
    if named:
        raise TeacherCacheError(f"the source images of latent cache {latent_cache} shard {s} (images {lo}..{hi - 1}) "
                                f"are not the files it encoded: {named}. Write the teacher cache from the dataset the "
                                f"latent cache was written from ({m['dataset']['root']}, unchanged), or rebuild the "
                                "latent cache first")


def write_teacher_cache(dataset, teacher, out_dir: str, latent_cache: str, *, batch_size: int = 32, rank: int = 0,
                        world_size: int = 1, num_workers: int = 0, progress: bool = True,
                        stop_after_shards: Optional[int] = None) -> dict:
    """Run ``teacher`` on every crop of the finished latent cache at ``latent_cache`` (the same images, crops,
    views and flips) and write the shards of rank ``rank`` of ``world_size`` (shard ``s`` on rank ``s % W``) into
    ``out_dir``; returns {"written", "skipped", "num_shards"}. Finish with :func:`write_teacher_manifest` once
    every rank is done. A rerun skips finished shards; ``stop_after_shards`` (tests) stops early as a crash would.

    Refused: a latent cache written by the DALI loader (its crops are seeded per shard, not per image), a teacher
    whose image size is not the cache's resolution, a dataset that is not the one the latent cache was written
    from (size or labels), an image that the latent cache holds and that no longer decodes."""
    lat = LatentCache(latent_cache, verify="records")
    m = lat.manifest
    if m["loader"] != "torchvision":
        raise TeacherCacheError(f"latent cache {latent_cache} was written with --loader {m['loader']}: the teacher "
                                "cache reproduces the torchvision loader's per-image crops; rebuild the latent cache "
                                "with --loader torchvision")
    if teacher.image_size != m["resolution"]:
        raise TeacherCacheError(f"teacher set up for {teacher.image_size} px images, latent cache {latent_cache} "
                                f"holds {m['resolution']} px crops")
    if len(dataset) != m["num_source_images"]:
        raise TeacherCacheError(f"dataset {getattr(dataset, 'root', '')!r} has {len(dataset)} images, latent cache "
                                f"{latent_cache} was written from {m['num_source_images']}: not the same dataset")
    views, flips = int(m["views"]), 2 if m.get("flips", True) else 1
    settings = {"crop_set": crop_set(m), "teacher": teacher.identity(), "dtype": "bf16", "tokens": teacher.num_tokens,
                "dim": teacher.dim, "views": views, "flips": flips == 2}
    os.makedirs(out_dir, exist_ok=True)
    aug = m["augment"]
    transform = build_transform(aug["name"], m["resolution"], aug["crop_scale_min"], flip=False)
    num_shards = len(lat.shards)
    mine = [s for s in range(num_shards) if s % world_size == rank]
    todo, skipped = [], []
    for s in mine:
        (skipped if _shard_done(out_dir, s, settings) else todo).append(s)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(lat.shards[s]["index"]) for s in todo), unit="img", desc=f"teacher cache rank {rank}",
                   dynamic_ncols=True, mininterval=1.0)
    written = []
    for s in todo:
        if stop_after_shards is not None and len(written) >= stop_after_shards:
            break
        _check_sources(dataset, m, s, latent_cache)
        index = np.asarray(lat.shards[s]["index"], np.int64)
        labels = np.asarray(lat.shards[s]["label"], np.int64)
        batches = [index[i:i + batch_size].tolist() for i in range(0, len(index), batch_size)]
        task = _BatchTask(dataset, transform, batches, m["seed"], 0, False, views=views)
        dl = torch.utils.data.DataLoader(task, batch_size=None, num_workers=num_workers)
        feats, pos = [], 0
        for item in dl:
            if item["corrupt"]:
                path, err = item["corrupt"][0]
                raise TeacherCacheError(f"{path} is in latent cache {latent_cache} (shard {s}) but cannot be read "
                                        f"now ({err}): the dataset changed since the latent cache was written")
            n = len(item["labels"])
            if not np.array_equal(item["labels"].numpy(), labels[pos:pos + n]):
                raise TeacherCacheError(f"dataset labels differ from latent cache {latent_cache} (shard {s}): not the "
                                        f"dataset it was written from")
            x = item["images"].reshape(n * views, 3, m["resolution"], m["resolution"])
            per_flip = [teacher.from_unit_range(xi).to("cpu", torch.bfloat16)
                        for xi in ((x, x.flip(-1)) if flips == 2 else (x,))]        # (n*K, T, D) each
            f = torch.stack(per_flip, 1).reshape(n, views, flips, teacher.num_tokens, teacher.dim)
            bad = _nonfinite_rows(store_np(f).reshape(n, -1), "bf16")
            if bad.any():
                i = int(index[pos + bad.argmax()])
                raise TeacherCacheError(f"teacher gave non-finite tokens for source image {i} "
                                        f"({dataset.samples[i].path}); nothing written for shard {s}")
            feats.append(f)
            pos += n
            if bar is not None:
                bar.update(n)
        empty = torch.zeros((0, views, flips, teacher.num_tokens, teacher.dim), dtype=torch.bfloat16)
        _write_shard(out_dir, s, torch.cat(feats) if feats else empty, index, settings)
        written.append(s)
    if bar is not None:
        bar.close()
    return {"written": written, "skipped": skipped, "num_shards": num_shards}


def write_teacher_manifest(out_dir: str) -> dict:
    """Collect the shard sidecars into manifest.json (once, after every rank finished)."""
    sides = sorted(f for f in os.listdir(out_dir) if f.startswith("shard_") and f.endswith(".json")) \
        if os.path.isdir(out_dir) else []
    if not sides:
        raise TeacherCacheError(f"no finished shards in {out_dir}")
    metas = [read_checked_json(os.path.join(out_dir, f), what="teacher-feature cache shard sidecar") for f in sides]
    settings = metas[0]["settings"]
    if any(mt["settings"] != settings for mt in metas):
        raise TeacherCacheError(f"{out_dir}: shard sidecars were written with different settings (teacher or crops); "
                                "delete the folder and write the cache again")
    num_shards = len(settings["crop_set"]["shards"])
    have = {mt["shard"] for mt in metas}
    missing = [s for s in range(num_shards) if s not in have]
    if missing:
        raise TeacherCacheError(f"{out_dir}: shards {missing[:10]} ({len(missing)} of {num_shards}) are not written "
                                "yet; rerun the writer with the same arguments to finish them")
    manifest = {"format": FORMAT, "version": VERSION, "num_images": sum(mt["count"] for mt in metas), **settings,
                "shards": [{k: mt[k] for k in ("file", "count", "sha256", "bytes", "header_sha256", "arrays_crc32")}
                           for mt in sorted(metas, key=lambda mt: mt["shard"])],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return write_checked_json(os.path.join(out_dir, "manifest.json"), manifest, key="manifest_sha256")


class TeacherFeatureCache:
    """Read access to a finished teacher-feature cache: ``gather(positions, views, flips) -> (n, T, D)`` bf16, with
    positions, views and flips those of the latent cache it belongs to (:meth:`check` ties the two).

    ``verify`` as the latent cache's ``data.latent_verify``: "records" (manifest hash, sizes, header hashes and
    array CRCs when opened; each record's CRC when first read), "sha256" (also every shard's sha256 when opened),
    "size" or "none". Every mode checks that the tokens read are finite."""

    def __init__(self, path: str, verify: str = "records"):
        if verify not in VERIFY:
            raise TeacherCacheError(f"verify={verify!r} is unknown; use one of {', '.join(VERIFY)}")
        mpath = os.path.join(path, "manifest.json")
        if not os.path.isfile(mpath):
            raise TeacherCacheError(f"no manifest.json in teacher-feature cache folder {path!r}: write it with "
                                    "usp_scale.data.teacher_cache.write_teacher_cache and then write_teacher_manifest "
                                    "(an unfinished cache has shard sidecars but no manifest)")
        try:
            head = read_json(mpath, what="teacher-feature cache manifest")
            if not isinstance(head, dict) or head.get("format") != FORMAT:
                raise TeacherCacheError(f"{mpath} is not a usp_scale teacher-feature cache manifest")
            if head.get("version") != VERSION:
                raise TeacherCacheError(f"{mpath}: teacher cache version {head.get('version')}, this usp_scale reads "
                                        f"version {VERSION}; write the cache again")
            m = read_checked_json(mpath, what="teacher-feature cache manifest", key="manifest_sha256") \
                if verify != "none" else head
        except CheckpointFileError as e:
            raise TeacherCacheError(str(e)) from e
        self.manifest, self.path, self.verify = m, path, verify
        self.tokens, self.dim = int(m["tokens"]), int(m["dim"])
        self.views, self.flips = int(m["views"]), 2 if m["flips"] else 1
        self.files = [os.path.join(path, sh["file"]) for sh in m["shards"]]
        self.shards, bad = [], []
        for fp, sh in zip(self.files, m["shards"]):
            if not os.path.isfile(fp):
                raise TeacherCacheError(f"teacher-feature cache shard missing: {fp}")
            if verify != "none" and os.path.getsize(fp) != sh["bytes"]:
                bad.append(f"{fp} (size {os.path.getsize(fp)} != {sh['bytes']})")
                continue
            header = header_bytes(fp, _WHAT)
            if verify in ("records", "sha256") and hashlib.sha256(header).hexdigest() != sh["header_sha256"]:
                bad.append(f"{fp} (header changed)")
                continue
            d = _open_safetensors(fp, header, what=_WHAT)
            want = (sh["count"], self.views, self.flips, self.tokens, self.dim)
            if set(d) != {"features", *ARRAYS} or d["features"].shape != want:
                bad.append(f"{fp} (tensors {sorted(d)}, features {d.get('features', np.zeros(0)).shape} != {want})")
                continue
            problem = shard_content_problem(fp, d, sh, verify, ARRAYS)
            if problem:
                bad.append(problem)
                continue
            self.shards.append(d)
        if bad:
            raise TeacherCacheError(f"teacher-feature cache shards do not match {mpath}: " + "; ".join(bad) +
                                    " - delete them and their .json sidecars and rerun the writer to rewrite them")
        self._verified = [np.zeros(d["crc"].shape, bool) for d in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum([len(d["index"]) for d in self.shards])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def check(self, *, latent_cache=None, teacher_content: Optional[str] = None, tokens: Optional[int] = None) -> None:
        """Raise naming every difference from the job: the latent cache (a :class:`LatentCache` or its folder) must
        hold the same crop set, the teacher the same content fingerprint, the model the same token count."""
        m, diffs = self.manifest, []
        if latent_cache is not None:
            lat = latent_cache if isinstance(latent_cache, LatentCache) else LatentCache(latent_cache, verify="size")
            theirs = crop_set(lat.manifest)
            if theirs != m["crop_set"]:
                keys = [k for k in theirs if theirs[k] != m["crop_set"].get(k)]
                diffs.append(f"crops: written for another crop set than latent cache {lat.path} ({', '.join(keys)} "
                             f"differ{': the shards hold other images' if keys == ['shards'] else ''})")
        if teacher_content is not None and m["teacher"]["content"] != teacher_content:
            diffs.append(f"teacher: the cache holds the tokens of teacher {m['teacher']['name']} with content "
                         f"fingerprint {m['teacher']['content']} (from {m['teacher'].get('source')!r}); the job's "
                         f"teacher has fingerprint {teacher_content} (other weights or preprocessing)")
        if tokens is not None and tokens != self.tokens:
            diffs.append(f"tokens: the cache holds {self.tokens} tokens per image, the model has {tokens}")
        if diffs:
            raise TeacherCacheError(f"teacher-feature cache {self.path} does not match the job: " + "; ".join(diffs))

    def gather(self, idx, view, flip) -> torch.Tensor:
        """Latent-cache positions ``idx`` with their view/flip -> teacher tokens (n, T, D) bf16 (CPU).

        Raises :class:`TeacherCacheError` naming the shard file and record when a record fails its CRC or holds
        non-finite tokens; nothing of such a batch is returned."""
        idx = np.asarray(idx, np.int64)
        view, flip = np.asarray(view, np.int64), np.asarray(flip, np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise TeacherCacheError(f"teacher-feature cache {self.path}: positions {idx.min()}..{idx.max()} outside "
                                    f"0..{len(self) - 1}")
        if self.flips == 1 and len(flip) and flip.max() > 0:
            raise TeacherCacheError(f"teacher-feature cache {self.path} holds no flipped records (its latent cache "
                                    "has none)")
        out = np.empty((len(idx), self.tokens, self.dim), np.int16)
        sh = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(sh):
            sel = np.nonzero(sh == s)[0]
            loc = idx[sel] - self.offsets[s]
            rec = self.shards[s]["features"][loc, view[sel], flip[sel]]              # (m, T, D) int16 bits
            self._verify(s, loc, view[sel], flip[sel], rec)
            out[sel] = rec
        return torch.from_numpy(out).view(torch.bfloat16)

    def _verify(self, s, loc, view, flip, rec) -> None:
        bad, what = np.zeros(len(loc), bool), ""
        if self.verify in ("records", "sha256"):
            done = self._verified[s]
            rows = np.nonzero(~done[loc, view, flip])[0]
            if len(rows):
                want = self.shards[s]["crc"][loc[rows], view[rows], flip[rows]].view(np.uint32)
                got = record_crcs(rec[rows])
                bad[rows] = got != want
                ok = rows[got == want]
                done[loc[ok], view[ok], flip[ok]] = True
            what = "fails its CRC-32 (the shard changed after it was written)"
        if not bad.any():
            bad, what = _nonfinite_rows(rec, "bf16"), "holds non-finite tokens"
        if bad.any():
            j = int(np.nonzero(bad)[0][0])
            raise TeacherCacheError(
                f"{_WHAT} {self.files[s]}: record {int(loc[j])} (source image {int(self.shards[s]['index'][loc[j]])}, "
                f"view {int(view[j])}, flip {int(flip[j])}) {what}; {int(bad.sum())} of the {len(loc)} records read "
                f"from this shard are bad. Delete the shard and its .json sidecar and rerun the writer to rewrite it.")
