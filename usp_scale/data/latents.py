"""Multi-view latent cache: writer (sharded, resumable) and a memory-mapped, resumable reader.

Layout of a cache folder::

    manifest.json            counts, VAE identity, resolution, augmentation, dtype, shards + sha256
    shard_000000.safetensors mean, logvar: (n, K, 2, C, h, w) fp16|bf16  (view k, flip f: 0 plain, 1 flipped)
                             label: (n,) int64, index: (n,) int64 (position in the source dataset)
    shard_000000.json        sidecar written after the shard: count, sha256, corrupt files, settings

Shard ``s`` holds source images ``[s*S, (s+1)*S)`` minus corrupt ones; rank ``r`` of ``W`` writes the
shards with ``s % W == r``. A shard is written to a temporary name and renamed, then its sidecar; a
restarted job skips every shard whose sidecar exists, has the same settings and whose checksum matches.
View ``k`` of image ``i`` is the crop seeded by ``(seed, 0, i, k)``, so a rerun writes identical data.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .datasets import ImageDataset
from .loaders import CorruptTracker, ResumableLoader, _BatchTask
from .sampler import ShardSampler
from .transforms import build_transform, describe_augment, sample_seed
from ..vae.frozen import posterior_latents

FORMAT = "usp_scale.latent_cache"
VERSION = 1
STORE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_ST_DTYPES = {"F16": (np.float16, torch.float16), "BF16": (np.int16, torch.bfloat16), "I64": (np.int64, torch.int64),
              "F32": (np.float32, torch.float32)}


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


def _atomic_json(path: str, obj) -> None:
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def shard_name(s: int) -> str:
    return f"shard_{s:06d}"


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
        return [], [], [], [], bad
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
    return ([torch.stack(per_view_mu, 1)], [torch.stack(per_view_lv, 1)],       # (m,K,2,C,h,w)
            [labels], [index], bad)


def _write_shard(out_dir, s, means, logvars, labels, index, bad, settings) -> None:
    from safetensors.torch import save_file
    lat = settings["latent_shape"]
    empty = (0, settings["views"], 2, *lat)
    sd = {"mean": torch.cat(means).contiguous() if means else torch.zeros(empty, dtype=STORE_DTYPES[settings["dtype"]]),
          "logvar": torch.cat(logvars).contiguous() if logvars else torch.zeros(empty, dtype=STORE_DTYPES[settings["dtype"]]),
          "label": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
          "index": torch.cat(index) if index else torch.zeros(0, dtype=torch.long)}
    name = shard_name(s)
    final = os.path.join(out_dir, name + ".safetensors")
    tmp = os.path.join(out_dir, f".{name}.safetensors.tmp{os.getpid()}")
    # one metadata key only: safetensors writes a multi-key map in a per-process random order, which would
    # make identical shards differ in their checksums
    save_file(sd, tmp, metadata={"format": FORMAT})
    os.replace(tmp, final)  # a crash before this line leaves only a .tmp file, never a half shard
    _atomic_json(os.path.join(out_dir, name + ".json"),
                 {"file": name + ".safetensors", "shard": s, "count": int(len(sd["label"])),
                  "sha256": sha256_file(final), "bytes": os.path.getsize(final),
                  "corrupt": [[p, m] for p, m in bad], "settings": settings})


def _shard_done(out_dir: str, s: int, settings: dict) -> bool:
    side = os.path.join(out_dir, shard_name(s) + ".json")
    final = os.path.join(out_dir, shard_name(s) + ".safetensors")
    if not (os.path.isfile(side) and os.path.isfile(final)):
        return False
    with open(side) as f:
        meta = json.load(f)
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
        with open(os.path.join(out_dir, f)) as fh:
            metas.append(json.load(fh))
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
                "shards": [{"file": m["file"], "count": m["count"], "sha256": m["sha256"], "bytes": m["bytes"]}
                           for m in metas],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _atomic_json(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


# --------------------------------------------------------------------------- reader

def _open_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Memory-map a safetensors file once and view each tensor as a numpy array (bf16 as int16 bits)."""
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    mm = np.memmap(path, dtype=np.uint8, mode="r")  # one mapping (and one file descriptor) per shard
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        np_dtype, _ = _ST_DTYPES[info["dtype"]]
        b, e = info["data_offsets"]
        shape = tuple(info["shape"])
        if e == b:
            out[name] = np.zeros(shape, np_dtype)
        else:
            out[name] = mm[8 + hlen + b: 8 + hlen + e].view(np_dtype).reshape(shape)
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
    """Read access to a finished cache: ``gather(indices, views, flips) -> (mean, logvar, label, index)``."""

    def __init__(self, path: str, verify: str = "size"):
        if verify not in ("none", "size", "sha256"):
            raise LatentCacheError(f"data.latent_verify={verify!r} is unknown; use none, size or sha256")
        mpath = os.path.join(path, "manifest.json")
        if not os.path.isfile(mpath):
            raise LatentCacheError(f"no manifest.json in latent cache folder {path!r}: build the cache with "
                                   f"`python launchers/cache_latents.py --data-root ... --out {path}` (an unfinished "
                                   f"cache has shard sidecars but no manifest; rerun the same command to finish it)")
        with open(mpath) as f:
            self.manifest = m = json.load(f)
        if m.get("format") != FORMAT:
            raise LatentCacheError(f"{mpath} is not a usp_scale latent cache manifest")
        self.path, self.views = path, int(m["views"])
        self.latent_shape = tuple(m["latent_shape"])
        bad = []
        for sh in m["shards"]:
            fp = os.path.join(path, sh["file"])
            if not os.path.isfile(fp):
                raise LatentCacheError(f"latent cache shard missing: {fp}")
            if verify in ("size", "sha256") and os.path.getsize(fp) != sh["bytes"]:
                bad.append(f"{fp} (size {os.path.getsize(fp)} != {sh['bytes']})")
            elif verify == "sha256" and sha256_file(fp) != sh["sha256"]:
                bad.append(f"{fp} (sha256 mismatch)")
        if bad:
            raise LatentCacheError("latent cache shards fail their checksum: " + "; ".join(bad) +
                                   " - delete them and their .json sidecars and rerun cache_latents.py to rewrite them")
        _ensure_open_files(len(m["shards"]))
        self.shards = [_open_safetensors(os.path.join(path, sh["file"])) for sh in m["shards"]]
        self.storage = torch.bfloat16 if m["dtype"] == "bf16" else torch.float16
        counts = [len(s["label"]) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.labels = torch.from_numpy(np.concatenate([np.asarray(s["label"]) for s in self.shards])
                                       if counts else np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def check(self, *, image_size: Optional[int] = None, vae_version: Optional[str] = None,
              vae_name: Optional[str] = None, latent_shape: Optional[Sequence[int]] = None) -> None:
        """Raise naming every difference between the manifest and the request."""
        m, diffs = self.manifest, []
        if image_size is not None and m["resolution"] != image_size:
            diffs.append(f"resolution: cache {m['resolution']} vs requested data.image_size={image_size}")
        if vae_version is not None and m["vae"]["version"] != vae_version:
            diffs.append(f"VAE version: cache {m['vae']['version']} vs requested vae.version={vae_version}")
        if vae_name is not None and m["vae"]["name"] != vae_name:
            diffs.append(f"VAE: cache made with {m['vae']['path']!r} (name {m['vae']['name']!r}) vs requested "
                         f"vae.path name {vae_name!r}")
        if latent_shape is not None and tuple(latent_shape) != self.latent_shape:
            diffs.append(f"latent shape: cache {self.latent_shape} vs expected {tuple(latent_shape)}")
        if diffs:
            raise LatentCacheError(f"latent cache {self.path} does not match the job: " + "; ".join(diffs))

    def _arr(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.view(torch.bfloat16) if self.storage == torch.bfloat16 else t

    def gather(self, idx: np.ndarray, view: np.ndarray, flip: np.ndarray):
        """Cached positions ``idx`` with their view/flip -> mean, logvar (n,C,h,w) storage dtype, label, index."""
        idx = np.asarray(idx, np.int64)
        sh = np.searchsorted(self.offsets, idx, side="right") - 1
        mean = np.empty((len(idx),) + self.latent_shape, np.int16 if self.storage == torch.bfloat16 else np.float16)
        logvar = np.empty_like(mean)
        index = np.empty(len(idx), np.int64)
        for s in np.unique(sh):
            sel = np.nonzero(sh == s)[0]
            loc = idx[sel] - self.offsets[s]
            d = self.shards[s]
            mean[sel] = d["mean"][loc, view[sel], flip[sel]]
            logvar[sel] = d["logvar"][loc, view[sel], flip[sel]]
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
