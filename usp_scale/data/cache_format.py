"""The latent cache format (version 2), beside its writer (:mod:`usp_scale.data.cache_writer`, the images: datasets,
crops, DALI) and its reader (:mod:`usp_scale.data.cache_reader`): the folder layout, the one plain + flipped
encoding through the VAE, and the shard / sidecar / manifest files.

Layout of a cache folder::

    manifest.json            counts, VAE identity (content fingerprint), resolution, augmentation, dtype, and per
                             shard its size, sha256, header sha256, array CRCs and source-file fingerprint (path,
                             size, mtime); a sha256 of its own content
    shard_000000.safetensors mean, logvar: (n, K, 2, C, h, w) fp16|bf16  (view k, flip f: 0 plain, 1 flipped)
                             label: (n,) int64, index: (n,) int64 (position in the source dataset)
                             crc: (n, K, 2) CRC-32 of record (i, k, f): its mean bytes, then its logvar bytes
    shard_000000.json        sidecar written after the shard: count, checksums, corrupt files, settings

Shard ``s`` holds source images ``[s*S, (s+1)*S)`` minus corrupt ones (and images whose moments are not finite
in the storage dtype). A shard is written to a temporary name and renamed (:func:`usp_scale.fileio.atomic_write`),
then its sidecar; a restarted job skips every shard whose sidecar exists, has the same settings and whose
checksum matches (:func:`shard_done`).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
import zlib
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from ..checkpoint.safe_load import CheckpointFileError, read_checked_json, write_checked_json
from ..fileio import atomic_write, sha256_file  # noqa: F401 (sha256_file: part of this module's API)

FORMAT = "usp_scale.latent_cache"
VERSION = 2
STORE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ARRAYS = ("label", "index", "crc")  # checked whole when a cache is opened (mean/logvar: per record, when read)


class LatentCacheError(ValueError):
    """A cache that does not match the request, or is incomplete or damaged."""

def shard_name(s: int) -> str:
    return f"shard_{s:06d}"

def record_crcs(mean: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """CRC-32 of each record (leading index) over its mean bytes, then its logvar bytes -> (n,) uint32.

    ``mean``/``logvar``: C-contiguous (n, ...) arrays of the storage dtype (bf16 as int16 bits)."""
    if len(mean) == 0:  # an empty shard (numpy cannot infer -1 for zero records)
        return np.empty(0, np.uint32)
    m, lv = mean.reshape(len(mean), -1), logvar.reshape(len(logvar), -1)
    out = np.empty(len(m), np.uint32)
    for i in range(len(m)):
        out[i] = zlib.crc32(lv[i], zlib.crc32(m[i]))
    return out

def store_np(t: torch.Tensor) -> np.ndarray:
    """Storage tensor -> numpy (bf16 as its int16 bits)."""
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def header_bytes(path: str, what: str = "latent cache shard") -> bytes:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LatentCacheError(f"{what} {path} is truncated ({len(head)} bytes)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > os.path.getsize(path) - 8 or hlen > 1 << 24:
            raise LatentCacheError(f"{what} {path}: header length {hlen} does not fit the file "
                                   f"({os.path.getsize(path)} bytes); the file is damaged")
        return head + f.read(hlen)


def settings_sha(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def encode_flips(vae, x: torch.Tensor, batch_size: int, dtype: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The one plain + flipped encoding of the cache: images ``x`` (n, 3, H, W) in [-1, 1] on any device ->
    (mean, logvar), each (n, 2, C, h, w) on the CPU in the storage ``dtype`` (index 1: horizontally flipped).

    The VAE sees the plain images in chunks of ``batch_size``, then the flipped ones in chunks of
    ``batch_size``; a given (batch_size, images) therefore always encodes identically."""
    st = STORE_DTYPES[dtype]
    mu, lv = [], []
    for xi in (x, x.flip(-1)):
        for c in range(0, len(xi), batch_size):
            a, b = vae.encode_moments(xi[c:c + batch_size])                 # (b,C,h,w) each
            mu.append(a.to("cpu", st))
            lv.append(b.to("cpu", st))
    shape = (2, len(x)) + tuple(mu[0].shape[1:])
    return torch.cat(mu).reshape(shape).transpose(0, 1), torch.cat(lv).reshape(shape).transpose(0, 1)


def drop_nonfinite(means: List[torch.Tensor], logvars: List[torch.Tensor], labels: List[torch.Tensor],
                   index: List[torch.Tensor], path_of: Callable[[int], str]) -> tuple:
    """Remove images whose stored moments are not finite (e.g. an fp16 overflow): returns (means, logvars,
    labels, index, dropped) with ``dropped`` = [(path_of(source index), reason)] to report as corrupt."""
    if not means:
        return means, logvars, labels, index, []
    mu, lv, lab, ix = torch.cat(means), torch.cat(logvars), torch.cat(labels), torch.cat(index)
    ok = torch.isfinite(mu).flatten(1).all(1) & torch.isfinite(lv).flatten(1).all(1)
    if bool(ok.all()):
        return [mu], [lv], [lab], [ix], []
    new = [(path_of(int(i)), "the VAE's moments are not finite in the cache dtype (overflow?)")
           for i in ix[~ok].tolist()]
    return [mu[ok]], [lv[ok]], [lab[ok]], [ix[ok]], new


def write_shard(out_dir, s, means, logvars, labels, index, bad, settings, sources: Optional[dict] = None) -> None:
    """Write shard ``s`` (lists of (m, K, 2, C, h, w) moments, (m,) labels and source indices; ``bad``: the
    [(path, reason)] of its corrupt images) and then its sidecar; a full disk is a DiskFullError naming it."""
    from safetensors.torch import save_file

    lat = settings["latent_shape"]
    empty = (0, settings["views"], 2, *lat)
    st = STORE_DTYPES[settings["dtype"]]
    mean = torch.cat(means).contiguous() if means else torch.zeros(empty, dtype=st)
    logvar = torch.cat(logvars).contiguous() if logvars else torch.zeros(empty, dtype=st)
    n, k = mean.shape[:2]
    if n == 0 and bad:  # every image of the shard unreadable: an empty shard (a rerun skips it), its files named
        print(f"[usp_scale] cache shard {s}: every one of its {len(bad)} images is unreadable; written empty, the "
              f"files: {', '.join(p for p, _ in bad)}", file=sys.stderr, flush=True)
    rec = int(np.prod(lat))  # explicit: numpy cannot infer -1 for zero records
    crc = record_crcs(store_np(mean).reshape(n * k * 2, rec), store_np(logvar).reshape(n * k * 2, rec))
    sd = {"mean": mean, "logvar": logvar,
          "label": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
          "index": torch.cat(index) if index else torch.zeros(0, dtype=torch.long),
          "crc": torch.from_numpy(crc.view(np.int32).reshape(n, k, 2).copy())}
    name = shard_name(s)
    final = os.path.join(out_dir, name + ".safetensors")
    # one metadata key only: safetensors writes a multi-key map in a per-process random order, which would
    # make identical shards differ in their checksums. It ties the shard to its position and settings, so a
    # shard moved to another name or taken from another cache fails its header hash.
    ident = json.dumps({"format": FORMAT, "version": VERSION, "shard": s, "settings": settings_sha(settings)},
                       sort_keys=True)
    with atomic_write(final, needed=sum(t.numel() * t.element_size() for t in sd.values())) as tmp:
        save_file(sd, tmp, metadata={"usp_scale": ident})  # a crash before the rename leaves no half shard
    write_checked_json(os.path.join(out_dir, name + ".json"),
                       {"file": name + ".safetensors", "shard": s, "count": int(n), "sha256": sha256_file(final),
                        "bytes": os.path.getsize(final),
                        "header_sha256": hashlib.sha256(header_bytes(final)).hexdigest(),
                        "arrays_crc32": {a: zlib.crc32(store_np(sd[a])) for a in ARRAYS},
                        "corrupt": [[p, m] for p, m in bad], "settings": settings, "sources": sources})


def read_sidecar(side: str) -> Optional[dict]:
    """A shard sidecar, or None when it is damaged (the shard is then written again)."""
    try:
        return read_checked_json(side, what="latent cache shard sidecar")
    except CheckpointFileError:
        return None


def source_fingerprint(paths: List[str]) -> Optional[dict]:
    """What identifies a shard's source images without reading them: sha256 over (path, size, mtime) of each file,
    and the newest mtime. None when the sources are not plain files (tar members)."""
    h = hashlib.sha256()
    newest = 0
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return None
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        newest = max(newest, st.st_mtime_ns)
    return {"sha256": h.hexdigest(), "newest_mtime_ns": newest}


def shard_done(out_dir: str, s: int, settings: dict, sources: Optional[List[str]] = None) -> bool:
    """Whether shard ``s`` is finished with these ``settings``; a different setting, or (``sources``: the shard's
    source files) source files changed in place since it was written, is a :class:`LatentCacheError` naming them."""
    side = os.path.join(out_dir, shard_name(s) + ".json")
    final = os.path.join(out_dir, shard_name(s) + ".safetensors")
    if not (os.path.isfile(side) and os.path.isfile(final)):
        return False
    meta = read_sidecar(side)
    if meta is None:
        return False
    if meta["settings"] != settings:
        diff = [k for k in settings if meta["settings"].get(k) != settings[k]]
        raise LatentCacheError(f"{side} was written with different settings ({', '.join(diff)} differ: "
                               f"{[(k, meta['settings'].get(k)) for k in diff]} vs now "
                               f"{[(k, settings[k]) for k in diff]}); use a new output folder or delete the old shards")
    old = meta.get("sources")
    if sources is not None:
        named = changed_sources(sources, old)
        if named:
            raise LatentCacheError(f"{side}: the source images of shard {s} changed since it was written (size or "
                                   f"modification time): {named}. Its latents are stale: delete {final} and its "
                                   ".json (or the whole cache folder) and rerun to encode them again")
    return os.path.getsize(final) == meta["bytes"] and sha256_file(final) == meta["sha256"]


def changed_sources(paths: List[str], old: Optional[dict]) -> str:
    """"" when ``paths`` still match the :func:`source_fingerprint` ``old`` (or either is unknown: no fingerprint
    recorded, or sources that are not plain files), else the files that differ, named: those modified after it,
    gone, or a note that files were renamed or replaced keeping older modification times."""
    now = source_fingerprint(paths) if old is not None else None
    if now is None or now["sha256"] == old["sha256"]:
        return ""
    changed = []
    for p in paths:
        try:
            if os.stat(p).st_mtime_ns > old["newest_mtime_ns"]:
                changed.append(p)
        except OSError:
            changed.append(p + " (gone)")
    if not changed:
        return "files renamed, moved or replaced keeping older modification times"
    return ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")


def write_manifest(out_dir: str) -> dict:
    """Collect the sidecars into manifest.json (run once, after every rank finished)."""
    sides = sorted(f for f in os.listdir(out_dir) if f.startswith("shard_") and f.endswith(".json"))
    if not sides:
        raise LatentCacheError(f"no finished shards in {out_dir}")
    metas = []
    for f in sides:
        meta = read_sidecar(os.path.join(out_dir, f))
        if meta is None:
            raise LatentCacheError(f"{os.path.join(out_dir, f)} is damaged: rerun launchers/cache_latents.py with the "
                                   "same arguments to write that shard again")
        metas.append(meta)
    settings = metas[0]["settings"]
    num_shards = -(-settings["num_source_images"] // settings["shard_size"])
    have = {m["shard"] for m in metas}
    missing = [s for s in range(num_shards) if s not in have]
    if missing:
        raise LatentCacheError(f"{out_dir}: shards {missing[:10]} ({len(missing)} of {num_shards}) are not written "
                               f"yet; rerun launchers/cache_latents.py with the same arguments to finish them")
    corrupt = [c for m in metas for c in m["corrupt"]]
    manifest = {"format": FORMAT, "version": VERSION, "num_images": sum(m["count"] for m in metas),
                "num_corrupt": len(corrupt), "corrupt": corrupt, "flips": True, **settings,
                "shards": [{**{k: m[k] for k in ("file", "count", "sha256", "bytes", "header_sha256", "arrays_crc32")},
                            **({"sources": m["sources"]} if m.get("sources") else {})} for m in metas],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return write_checked_json(os.path.join(out_dir, "manifest.json"), manifest, key="manifest_sha256")
