"""Multi-view latent cache: writer (sharded, resumable) and a memory-mapped, resumable, verified reader.

Layout of a cache folder::

    manifest.json            counts, VAE identity (content fingerprint), resolution, augmentation, dtype, and per
                             shard its size, sha256, header sha256 and array CRCs; a sha256 of its own content
    shard_000000.safetensors mean, logvar: (n, K, 2, C, h, w) fp16|bf16  (view k, flip f: 0 plain, 1 flipped)
                             label: (n,) int64, index: (n,) int64 (position in the source dataset)
                             crc: (n, K, 2) CRC-32 of record (i, k, f): its mean bytes, then its logvar bytes
    shard_000000.json        sidecar written after the shard: count, checksums, corrupt files, settings

Shard ``s`` holds source images ``[s*S, (s+1)*S)`` minus corrupt ones (and images whose moments are not finite
in the storage dtype); rank ``r`` of ``W`` writes the shards with ``s % W == r``. A shard is written to a
temporary name and renamed, then its sidecar; a restarted job skips every shard whose sidecar exists, has the
same settings and whose checksum matches. View ``k`` of image ``i`` is the crop seeded by ``(seed, 0, i, k)``,
so a rerun writes identical data.

Integrity (``data.latent_verify``, default ``records``): opening checks the manifest's own hash, each shard's
size, header hash and label/index/crc array CRCs (cheap: no record data is read); every batch then checks
the CRC of each record it reads and that its moments are finite, before anything reaches the model. A changed
byte anywhere in a shard is a :class:`LatentCacheError` naming the file and, for record data, the record.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zlib
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..checkpoint.safe_load import CheckpointFileError, read_checked_json, read_json, write_checked_json
from ..fileio import atomic_write
from .datasets import ImageDataset
from .loaders import CorruptTracker, ResumableLoader, _BatchTask
from .sampler import ShardSampler
from .transforms import build_transform, describe_augment, sample_seed
from ..vae.frozen import posterior_latents

FORMAT = "usp_scale.latent_cache"
VERSION = 2
VERIFY = ("records", "sha256", "size", "none")
STORE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_ST_DTYPES = {"F16": (np.float16, torch.float16), "BF16": (np.int16, torch.bfloat16), "I64": (np.int64, torch.int64),
              "F32": (np.float32, torch.float32), "I32": (np.int32, torch.int32)}
# |bits| >= this in the 16-bit pattern (sign masked) means inf or NaN: fp16 exponent all ones, bf16 likewise
_NONFINITE_BITS = {"fp16": 0x7C00, "bf16": 0x7F80}
_ARRAYS = ("label", "index", "crc")  # checked whole when a cache is opened (mean/logvar: per record, when read)


class LatentCacheError(ValueError):
    """A cache that does not match the request, or is incomplete or damaged."""


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def shard_name(s: int) -> str:
    return f"shard_{s:06d}"


def record_crcs(mean: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """CRC-32 of each record (leading index) over its mean bytes, then its logvar bytes -> (n,) uint32.

    ``mean``/``logvar``: C-contiguous (n, ...) arrays of the storage dtype (bf16 as int16 bits)."""
    m, lv = mean.reshape(len(mean), -1), logvar.reshape(len(logvar), -1)
    out = np.empty(len(m), np.uint32)
    for i in range(len(m)):
        out[i] = zlib.crc32(lv[i], zlib.crc32(m[i]))
    return out


def _nonfinite_rows(a: np.ndarray, dtype: str) -> np.ndarray:
    """(n,) bool: rows of the 16-bit storage array ``a`` (n, ...) holding an inf or NaN."""
    bits = a.reshape(len(a), -1).view(np.uint16) & 0x7FFF
    return bits.max(axis=1, initial=0) >= _NONFINITE_BITS[dtype]


def _store_np(t: torch.Tensor) -> np.ndarray:
    """Storage tensor -> numpy (bf16 as its int16 bits)."""
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _header_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LatentCacheError(f"latent cache shard {path} is truncated ({len(head)} bytes)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > os.path.getsize(path) - 8 or hlen > 1 << 24:
            raise LatentCacheError(f"latent cache shard {path}: header length {hlen} does not fit the file "
                                   f"({os.path.getsize(path)} bytes); the file is damaged")
        return head + f.read(hlen)


def _settings_sha(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- writer

def write_cache(dataset: ImageDataset, vae, out_dir: str, *, image_size: int = 224, augment: str = "pretrain",
                crop_scale_min: float = 0.2, views: int = 1, seed: int = 0, dtype: str = "fp16",
                shard_size: int = 1000, batch_size: int = 64, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, strict: bool = False, progress: bool = True, loader: str = "torchvision",
                stop_after_shards: Optional[int] = None) -> dict:
    """Encode ``dataset`` into ``out_dir``; returns a summary {"written", "skipped", "corrupt"} for this rank.

    ``augment`` is the crop of each view ("pretrain" = RandomResizedCrop, "adm", "eval", "none"); the flip
    is never random here: every view is stored plain and flipped. ``loader`` "torchvision" (PIL, crops
    seeded per (seed, image, view)) or "dali" (ImageFolder only; decodes on the VAE's GPU when it has one,
    crops seeded per (seed, shard, view)); both rerun a shard identically. ``stop_after_shards`` (tests)
    stops this rank after writing that many shards, as a crash would.
    """
    if loader not in ("torchvision", "dali"):
        raise LatentCacheError(f"cache loader {loader!r} is unknown; use torchvision or dali")
    if dtype not in STORE_DTYPES:
        raise LatentCacheError(f"cache dtype {dtype!r} is unknown; use fp16 or bf16")
    if views < 1:
        raise LatentCacheError(f"--views must be >= 1, got {views}")
    os.makedirs(out_dir, exist_ok=True)
    if strict:  # a corrupt image names this writer's switch, not the training key data.strict
        import copy
        dataset = copy.copy(dataset)
        dataset.strict_hint = "cache_latents.py --strict makes this an error; run without --strict to skip and report"
    n = len(dataset)
    num_shards = -(-n // shard_size)
    transform = build_transform(augment, image_size, crop_scale_min, flip=False)
    settings = {"num_source_images": n, "shard_size": shard_size, "views": views, "seed": seed, "dtype": dtype,
                "resolution": image_size, "augment": describe_augment(augment, image_size, crop_scale_min),
                "vae": vae.identity(), "latent_shape": list(vae.latent_shape(image_size)),
                "dataset": {"root": dataset.root, "num_classes": len(dataset.classes)}, "loader": loader}
    mine = [s for s in range(num_shards) if s % world_size == rank]
    todo, skipped = [], []
    for s in mine:
        (skipped if _shard_done(out_dir, s, settings) else todo).append(s)
    total_imgs = sum(min(shard_size, n - s * shard_size) for s in todo)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total_imgs, unit="img", desc=f"cache rank {rank}", dynamic_ncols=True, mininterval=1.0)
    tracker = CorruptTracker()
    written = []
    t0 = time.time()
    for s in todo:
        if stop_after_shards is not None and len(written) >= stop_after_shards:
            break
        idx = list(range(s * shard_size, min((s + 1) * shard_size, n)))
        if loader == "dali":
            shard = _encode_shard_dali(dataset, vae, s, idx, image_size=image_size, augment=augment,
                                       crop_scale_min=crop_scale_min, views=views, seed=seed, dtype=dtype,
                                       batch_size=batch_size, num_threads=max(1, num_workers), strict=strict)
            tracker.add(shard[4])
            if bar is not None:
                bar.update(len(idx))
                bar.set_postfix(img_per_s=f"{bar.n / max(time.time() - t0, 1e-9):.1f}", refresh=False)
            shard[:4] = _drop_nonfinite(dataset, *shard[:4], shard[4], tracker)
            _write_shard(out_dir, s, *shard, settings)
            written.append(s)
            continue
        batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
        task = _BatchTask(dataset, transform, batches, seed, 0, strict, views=views)
        dl = torch.utils.data.DataLoader(task, batch_size=None, num_workers=num_workers,
                                         pin_memory=vae.device.type == "cuda")
        means, logvars, labels, index, bad = [], [], [], [], []
        for item in dl:
            bad.extend(item["corrupt"])
            tracker.add(item["corrupt"])
            m = len(item["labels"])
            if m:
                x = item["images"].reshape(m * views, 3, image_size, image_size)       # (m*K,3,H,W)
                mu, lv = [], []
                for flip in (False, True):
                    xi = x.flip(-1) if flip else x
                    for c in range(0, len(xi), batch_size):
                        a, b = vae.encode_moments(xi[c:c + batch_size])                 # (b,C,h,w) each
                        mu.append(a.to("cpu", STORE_DTYPES[dtype]))
                        lv.append(b.to("cpu", STORE_DTYPES[dtype]))
                shape = (2, m, views) + tuple(mu[0].shape[1:])
                means.append(torch.cat(mu).reshape(shape).transpose(0, 1).transpose(1, 2))   # (m,K,2,C,h,w)
                logvars.append(torch.cat(lv).reshape(shape).transpose(0, 1).transpose(1, 2))
                labels.append(item["labels"])
                index.append(item["index"])
            if bar is not None:
                bar.update(m + len(item["corrupt"]))
                bar.set_postfix(img_per_s=f"{bar.n / max(time.time() - t0, 1e-9):.1f}", refresh=False)
        means, logvars, labels, index = _drop_nonfinite(dataset, means, logvars, labels, index, bad, tracker)
        _write_shard(out_dir, s, means, logvars, labels, index, bad, settings)
        written.append(s)
    if bar is not None:
        bar.close()
    return {"written": written, "skipped": skipped, "corrupt": dict(tracker.corrupt), "num_shards": num_shards}


def _encode_shard_dali(dataset, vae, s, idx, *, image_size, augment, crop_scale_min, views, seed, dtype,
                       batch_size, num_threads, strict):
    """One shard through DALI: view k of the shard is one pass seeded by (seed, shard, k)."""
    from .dali import DALIImageLoader, looks_complete
    from .datasets import CorruptImageError, TarDataset
    if isinstance(dataset, TarDataset):
        raise LatentCacheError("--loader dali reads ImageFolder data; use --loader torchvision for tar shards")
    bad, valid = [], []
    for i in idx:
        if looks_complete(dataset.samples[i].path):
            valid.append(i)
        elif strict:
            raise CorruptImageError(f"corrupt (truncated) image {dataset.samples[i].path} (--strict)")
        else:
            bad.append((dataset.samples[i].path, "truncated file (no end-of-image marker)"))
    if not valid:
        return [[], [], [], [], bad]
    st = STORE_DTYPES[dtype]
    sampler = ShardSampler(len(dataset), batch_size=batch_size, shuffle=False, even=False, drop_last=False)
    per_view_mu, per_view_lv, index = [], [], None
    for k in range(views):
        dl = DALIImageLoader(dataset, sampler, augment=augment + "_noflip", size=image_size,
                             crop_scale_min=crop_scale_min, device=vae.device, num_threads=num_threads,
                             strict=strict, precheck=False, indices=valid,
                             pipeline_seed=sample_seed(seed, s, k) % (1 << 31))
        mu, lv, ix = [], [], []
        for b in dl:
            x = b["images"]                                                   # (b,3,H,W) on the VAE device
            a, c = vae.encode_moments(torch.cat([x, x.flip(-1)]))             # (2b,C,h,w): plain, then flipped
            m = len(x)
            mu.append(torch.stack([a[:m], a[m:]], 1).to("cpu", st))          # (b,2,C,h,w)
            lv.append(torch.stack([c[:m], c[m:]], 1).to("cpu", st))
            ix.append(b["index"].cpu())
        per_view_mu.append(torch.cat(mu))
        per_view_lv.append(torch.cat(lv))
        index = torch.cat(ix)
    labels = torch.tensor([dataset.samples[i].label for i in index.tolist()], dtype=torch.long)
    return [[torch.stack(per_view_mu, 1)], [torch.stack(per_view_lv, 1)],       # (m,K,2,C,h,w)
            [labels], [index], bad]


def _drop_nonfinite(dataset, means, logvars, labels, index, bad, tracker):
    """Remove images whose stored moments are not finite (e.g. an fp16 overflow), reporting them as corrupt."""
    if not means:
        return means, logvars, labels, index
    mu, lv, lab, ix = torch.cat(means), torch.cat(logvars), torch.cat(labels), torch.cat(index)
    ok = torch.isfinite(mu).flatten(1).all(1) & torch.isfinite(lv).flatten(1).all(1)
    if bool(ok.all()):
        return [mu], [lv], [lab], [ix]
    new = [(dataset.samples[int(i)].path, "the VAE's moments are not finite in the cache dtype (overflow?)")
           for i in ix[~ok].tolist()]
    bad.extend(new)
    tracker.add(new)
    return [mu[ok]], [lv[ok]], [lab[ok]], [ix[ok]]


def _write_shard(out_dir, s, means, logvars, labels, index, bad, settings) -> None:
    from safetensors.torch import save_file
    lat = settings["latent_shape"]
    empty = (0, settings["views"], 2, *lat)
    st = STORE_DTYPES[settings["dtype"]]
    mean = torch.cat(means).contiguous() if means else torch.zeros(empty, dtype=st)
    logvar = torch.cat(logvars).contiguous() if logvars else torch.zeros(empty, dtype=st)
    n, k = mean.shape[:2]
    crc = record_crcs(_store_np(mean).reshape(n * k * 2, -1), _store_np(logvar).reshape(n * k * 2, -1))
    sd = {"mean": mean, "logvar": logvar,
          "label": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
          "index": torch.cat(index) if index else torch.zeros(0, dtype=torch.long),
          "crc": torch.from_numpy(crc.view(np.int32).reshape(n, k, 2).copy())}
    name = shard_name(s)
    final = os.path.join(out_dir, name + ".safetensors")
    # one metadata key only: safetensors writes a multi-key map in a per-process random order, which would
    # make identical shards differ in their checksums. It ties the shard to its position and settings, so a
    # shard moved to another name or taken from another cache fails its header hash.
    ident = json.dumps({"format": FORMAT, "version": VERSION, "shard": s, "settings": _settings_sha(settings)},
                       sort_keys=True)
    with atomic_write(final, needed=sum(t.numel() * t.element_size() for t in sd.values())) as tmp:
        save_file(sd, tmp, metadata={"usp_scale": ident})  # a crash before the rename leaves no half shard
    write_checked_json(os.path.join(out_dir, name + ".json"),
                       {"file": name + ".safetensors", "shard": s, "count": int(n), "sha256": sha256_file(final),
                        "bytes": os.path.getsize(final),
                        "header_sha256": hashlib.sha256(_header_bytes(final)).hexdigest(),
                        "arrays_crc32": {a: zlib.crc32(_store_np(sd[a])) for a in _ARRAYS},
                        "corrupt": [[p, m] for p, m in bad], "settings": settings})


def _read_sidecar(side: str) -> Optional[dict]:
    """A shard sidecar, or None when it is damaged (the shard is then written again)."""
    try:
        return read_checked_json(side, what="latent cache shard sidecar")
    except CheckpointFileError:
        return None


def _shard_done(out_dir: str, s: int, settings: dict) -> bool:
    side = os.path.join(out_dir, shard_name(s) + ".json")
    final = os.path.join(out_dir, shard_name(s) + ".safetensors")
    if not (os.path.isfile(side) and os.path.isfile(final)):
        return False
    meta = _read_sidecar(side)
    if meta is None:
        return False
    if meta["settings"] != settings:
        diff = [k for k in settings if meta["settings"].get(k) != settings[k]]
        raise LatentCacheError(f"{side} was written with different settings ({', '.join(diff)} differ: "
                               f"{[(k, meta['settings'].get(k)) for k in diff]} vs now "
                               f"{[(k, settings[k]) for k in diff]}); use a new output folder or delete the old shards")
    return os.path.getsize(final) == meta["bytes"] and sha256_file(final) == meta["sha256"]


def write_manifest(out_dir: str) -> dict:
    """Collect the sidecars into manifest.json (run once, after every rank finished)."""
    sides = sorted(f for f in os.listdir(out_dir) if f.startswith("shard_") and f.endswith(".json"))
    if not sides:
        raise LatentCacheError(f"no finished shards in {out_dir}")
    metas = []
    for f in sides:
        meta = _read_sidecar(os.path.join(out_dir, f))
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
                "shards": [{k: m[k] for k in ("file", "count", "sha256", "bytes", "header_sha256", "arrays_crc32")}
                           for m in metas],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return write_checked_json(os.path.join(out_dir, "manifest.json"), manifest, key="manifest_sha256")


# --------------------------------------------------------------------------- reader

def _open_safetensors(path: str, header: Optional[bytes] = None) -> Dict[str, np.ndarray]:
    """Memory-map a safetensors file once and view each tensor as a numpy array (bf16 as int16 bits).

    The header is validated as the safetensors format requires: known dtypes, each tensor's byte range matching
    its shape, the ranges contiguous and covering the rest of the file exactly."""
    header = header if header is not None else _header_bytes(path)
    hlen = len(header) - 8
    try:
        info = json.loads(header[8:])
    except ValueError as e:
        raise LatentCacheError(f"latent cache shard {path}: damaged header ({e})") from e
    size = os.path.getsize(path)
    entries = sorted((v["data_offsets"], k, v) for k, v in info.items() if k != "__metadata__")
    end = 0
    for (b, e), name, v in entries:
        if v.get("dtype") not in _ST_DTYPES or b != end or e < b or \
                (e - b) != int(np.prod(v["shape"])) * np.dtype(_ST_DTYPES[v["dtype"]][0]).itemsize:
            raise LatentCacheError(f"latent cache shard {path}: tensor {name!r} has an inconsistent header entry "
                                   f"{v}; the file is damaged")
        end = e
    if 8 + hlen + end != size:
        raise LatentCacheError(f"latent cache shard {path}: the header covers {8 + hlen + end} bytes, the file has "
                               f"{size}; the file is truncated or damaged")
    # one mapping (and descriptor) per shard, viewed as plain ndarrays (np.memmap's __getitem__ is slow)
    mm = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray) if size else None
    out = {}
    for (b, e), name, v in entries:
        np_dtype, _ = _ST_DTYPES[v["dtype"]]
        shape = tuple(v["shape"])
        out[name] = np.zeros(shape, np_dtype) if e == b else \
            mm[8 + hlen + b: 8 + hlen + e].view(np_dtype).reshape(shape)
    return out


def _ensure_open_files(n: int) -> None:
    """Each mapped shard keeps a file descriptor: raise the soft RLIMIT_NOFILE (up to the hard one) if needed."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = n + 1024
        if soft != resource.RLIM_INFINITY and soft < want:
            new = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            if new < want:
                raise LatentCacheError(f"the cache has {n} shards but only {new} files may be open (ulimit -n); "
                                       f"raise the limit or rebuild the cache with a larger --shard-size")
    except (ImportError, ValueError, OSError):
        pass


class LatentCache:
    """Read access to a finished cache: ``gather(indices, views, flips) -> (mean, logvar, label, index)``.

    ``verify`` (``data.latent_verify``): "records" (default: manifest hash, sizes, header hashes and array
    CRCs when opened; each record's CRC when read), "sha256" (also the sha256 of every whole shard when opened:
    reads the cache once), "size" (sizes and headers only: same-size damage goes unseen) or "none". Every
    mode checks, per record read, that its moments are finite."""

    def __init__(self, path: str, verify: str = "records"):
        if verify not in VERIFY:
            raise LatentCacheError(f"data.latent_verify={verify!r} is unknown; use one of {', '.join(VERIFY)}")
        mpath = os.path.join(path, "manifest.json")
        if not os.path.isfile(mpath):
            raise LatentCacheError(f"no manifest.json in latent cache folder {path!r}: build the cache with "
                                   f"`python launchers/cache_latents.py --data-root ... --out {path}` (an unfinished "
                                   f"cache has shard sidecars but no manifest; rerun the same command to finish it)")
        try:
            head = read_json(mpath, what="latent cache manifest")
            if not isinstance(head, dict) or head.get("format") != FORMAT:
                raise LatentCacheError(f"{mpath} is not a usp_scale latent cache manifest")
            if head.get("version") != VERSION:
                raise LatentCacheError(f"{mpath}: cache format version {head.get('version')}, this usp_scale reads "
                                       f"version {VERSION} (record checksums and the VAE content fingerprint); "
                                       "rebuild the cache with launchers/cache_latents.py")
            m = read_checked_json(mpath, what="latent cache manifest", key="manifest_sha256") \
                if verify != "none" else head
        except CheckpointFileError as e:
            raise LatentCacheError(str(e)) from e
        self.manifest = m
        self.path, self.views, self.verify = path, int(m["views"]), verify
        self.latent_shape = tuple(m["latent_shape"])
        self.dtype = m["dtype"]
        self.files = [os.path.join(path, sh["file"]) for sh in m["shards"]]
        _ensure_open_files(len(m["shards"]))
        self.shards, bad = [], []
        for fp, sh in zip(self.files, m["shards"]):
            if not os.path.isfile(fp):
                raise LatentCacheError(f"latent cache shard missing: {fp}")
            size = os.path.getsize(fp)
            if verify != "none" and size != sh["bytes"]:
                bad.append(f"{fp} (size {size} != {sh['bytes']})")
                continue
            header = _header_bytes(fp)
            if verify in ("records", "sha256") and hashlib.sha256(header).hexdigest() != sh["header_sha256"]:
                bad.append(f"{fp} (header changed)")
                continue
            d = _open_safetensors(fp, header)
            want = (sh["count"], self.views, 2) + self.latent_shape
            if set(d) != {"mean", "logvar", *_ARRAYS} or d["mean"].shape != want or d["logvar"].shape != want:
                bad.append(f"{fp} (tensors {sorted(d)} of shapes {[d[k].shape for k in sorted(d)]}, expected "
                           f"mean/logvar {want})")
                continue
            if verify in ("records", "sha256"):
                crcs = {a: zlib.crc32(d[a]) for a in _ARRAYS}
                wrong = [a for a in _ARRAYS if crcs[a] != sh["arrays_crc32"][a]]
                if wrong:
                    bad.append(f"{fp} ({'/'.join(wrong)} array changed)")
                    continue
            if verify == "sha256" and sha256_file(fp) != sh["sha256"]:
                bad.append(f"{fp} (sha256 mismatch)")
                continue
            self.shards.append(d)
        if bad:
            raise LatentCacheError(f"latent cache shards do not match {mpath}: " + "; ".join(bad) +
                                   " - delete them and their .json sidecars and rerun cache_latents.py to rewrite them"
                                   + (" (every shard differs: is the manifest another cache's?)"
                                      if len(bad) == len(m["shards"]) > 1 else ""))
        self.storage = torch.bfloat16 if m["dtype"] == "bf16" else torch.float16
        # (record, view, flip) slots whose CRC this process has checked
        self._verified = [np.zeros(d["crc"].shape, bool) for d in self.shards]
        counts = [len(s["label"]) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.labels = torch.from_numpy(np.concatenate([np.asarray(s["label"]) for s in self.shards])
                                       if counts else np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def check(self, *, image_size: Optional[int] = None, vae_version: Optional[str] = None,
              vae_path: Optional[str] = None, vae_content: Optional[str] = None,
              latent_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None) -> None:
        """Raise naming every difference between the manifest and the request.

        The VAE is compared by content: ``vae_content`` (a :func:`usp_scale.vae.frozen.content_fingerprint`), or
        that of the VAE at ``vae_path`` (loaded once); folder and file names play no part."""
        m, diffs = self.manifest, []
        if image_size is not None and m["resolution"] != image_size:
            diffs.append(f"resolution: cache {m['resolution']} vs requested data.image_size={image_size}")
        if vae_version is not None and m["vae"]["version"] != vae_version:
            diffs.append(f"VAE version: cache {m['vae']['version']} vs requested vae.version={vae_version}")
        elif vae_content is not None or vae_path is not None:
            if vae_content is None:
                from ..vae.frozen import path_content_fingerprint
                vae_content = path_content_fingerprint(vae_path, vae_version or m["vae"]["version"])
            if m["vae"].get("content") != vae_content:
                diffs.append(f"VAE: the cache was encoded by a VAE with content fingerprint {m['vae'].get('content')} "
                             f"(then at {m['vae']['path']!r}), vae.path={vae_path!r} holds different weights or "
                             f"architecture (fingerprint {vae_content})")
        if latent_shape is not None and tuple(latent_shape) != self.latent_shape:
            diffs.append(f"latent shape: cache {self.latent_shape} vs expected {tuple(latent_shape)}")
        if num_classes is not None and len(self.labels) and int(self.labels.max()) >= num_classes:
            diffs.append(f"labels: the cache has labels up to {int(self.labels.max())}, the model has "
                         f"{num_classes} classes (model.num_classes)")
        if diffs:
            raise LatentCacheError(f"latent cache {self.path} does not match the job: " + "; ".join(diffs))

    def _arr(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.view(torch.bfloat16) if self.storage == torch.bfloat16 else t

    def _verify_rows(self, s: int, loc: np.ndarray, view: np.ndarray, flip: np.ndarray, mean: np.ndarray,
                     logvar: np.ndarray) -> None:
        """Records ``loc`` of shard ``s`` as gathered: CRC (verify="records"/"sha256"; each (record, view, flip)
        is checked the first time this process reads it, then recorded as verified) and finiteness (always)."""
        d = self.shards[s]
        bad = np.zeros(len(loc), bool)
        what = ""
        if self.verify in ("records", "sha256"):
            done = self._verified[s]
            rows = np.nonzero(~done[loc, view, flip])[0]
            if len(rows):
                want = d["crc"][loc[rows], view[rows], flip[rows]].view(np.uint32)
                got = record_crcs(mean, logvar) if len(rows) == len(loc) else record_crcs(mean[rows], logvar[rows])
                bad[rows] = got != want
                ok = rows[got == want]
                done[loc[ok], view[ok], flip[ok]] = True
            what = "fails its CRC-32 (the shard changed after it was written)"
        if not bad.any():
            bad = _nonfinite_rows(mean, self.dtype) | _nonfinite_rows(logvar, self.dtype)
            what = "holds non-finite moments"
        if bad.any():
            j = int(np.nonzero(bad)[0][0])
            raise LatentCacheError(
                f"latent cache shard {self.files[s]}: record {int(loc[j])} (source image {int(d['index'][loc[j]])}, "
                f"view {int(view[j])}, flip {int(flip[j])}) {what}; {int(bad.sum())} of the {len(loc)} records read "
                f"from this shard in the batch are bad. Nothing of the batch reached the model. Delete the shard "
                f"and its .json sidecar and rerun launchers/cache_latents.py with the same arguments to rewrite it.")

    def gather(self, idx: np.ndarray, view: np.ndarray, flip: np.ndarray):
        """Cached positions ``idx`` with their view/flip -> mean, logvar (n,C,h,w) storage dtype, label, index.

        Raises :class:`LatentCacheError` naming the shard file and record when a record read is damaged or holds
        non-finite moments."""
        idx = np.asarray(idx, np.int64)
        view, flip = np.asarray(view, np.int64), np.asarray(flip, np.int64)
        sh = np.searchsorted(self.offsets, idx, side="right") - 1
        mean = np.empty((len(idx),) + self.latent_shape, np.int16 if self.storage == torch.bfloat16 else np.float16)
        logvar = np.empty_like(mean)
        index = np.empty(len(idx), np.int64)
        for s in np.unique(sh):
            sel = np.nonzero(sh == s)[0]
            loc = idx[sel] - self.offsets[s]
            d = self.shards[s]
            m, lv = d["mean"][loc, view[sel], flip[sel]], d["logvar"][loc, view[sel], flip[sel]]
            self._verify_rows(s, loc, view[sel], flip[sel], m, lv)
            mean[sel], logvar[sel] = m, lv
            index[sel] = d["index"][loc]
        return self._arr(mean), self._arr(logvar), self.labels[torch.from_numpy(idx)], torch.from_numpy(index)


class LatentCacheLoader(ResumableLoader):
    """Batches of cached latents: ``{"latents": (N,C,h,w) fp32 scaled on device, "labels", "index"}``.

    Per epoch each image gets one random view and flip (same draw on every rank, seeded by seed and
    epoch); the posterior is sampled (logvar clamped to [-30, 20]) with noise seeded by
    (seed, epoch, rank, batch), or the mean is taken. Sharded over the global rank by :class:`ShardSampler`.
    """

    def __init__(self, cache: LatentCache, sampler: ShardSampler, *, scale: float, sample: bool = True,
                 device="cpu"):
        super().__init__(sampler)
        self.cache, self.scale, self.sample, self.device = cache, scale, sample, torch.device(device)
        self._choice_epoch, self._choice = None, None

    def _choices(self) -> np.ndarray:
        if self._choice_epoch != self.epoch:
            g = torch.Generator().manual_seed(sample_seed(self.sampler.seed, self.epoch, 7))
            self._choice = torch.randint(0, 2 * self.cache.views, (len(self.cache),), generator=g,
                                         dtype=torch.int64).numpy()
            self._choice_epoch = self.epoch
        return self._choice

    def _iter_from(self, start: int):
        choice = self._choices()
        pin = self.device.type == "cuda"
        for b, batch in enumerate(self.sampler.batches(start), start=start):
            idx = np.asarray(batch, np.int64)
            c = choice[idx]
            mean, logvar, labels, index = self.cache.gather(idx, c // 2, c % 2)
            if pin:
                mean, logvar = mean.pin_memory(), logvar.pin_memory()
            mean = mean.to(self.device, non_blocking=pin)
            logvar = logvar.to(self.device, non_blocking=pin)
            gen = None
            if self.sample:
                gen = torch.Generator(device=self.device).manual_seed(
                    sample_seed(self.sampler.seed, self.epoch, self.sampler.rank, b))
            z = posterior_latents(mean, logvar, self.scale, sample=self.sample, generator=gen)  # (N,C,h,w)
            yield {"latents": z, "labels": labels.to(self.device, non_blocking=pin),
                   "index": index.to(self.device, non_blocking=pin),
                   "view": torch.from_numpy(c // 2).to(self.device), "flip": torch.from_numpy(c % 2).to(self.device)}
