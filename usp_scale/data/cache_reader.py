"""The latent cache reader: a memory-mapped, resumable, verified reader of the cache the writer made
(:mod:`usp_scale.data.cache_writer` reads the images, :mod:`usp_scale.data.cache_format` encodes them and defines the
format, version 2: the folder layout is described there).

Integrity (``data.latent_verify``, default ``records``): opening checks the manifest's own hash, each shard's
size, header hash and label/index/crc array CRCs (cheap: no record data is read); every batch then checks
the CRC of each record it reads and that its moments are finite, before anything reaches the model. A changed
byte anywhere in a shard is a :class:`LatentCacheError` naming the file and, for record data, the record.

The shards are parsed by this module's own safetensors reader (:func:`_open_safetensors`: one ``np.memmap`` per
shard, each tensor a numpy view, gathered by fancy indexing), not by the safetensors library's memory-mapped
``safe_open(...).get_slice`` (one slice per record: it has no gather). Measured on the same cache (2-core CPU,
``benchmarks/reports/data_reader_integrity_cpu_2026-12-01.md``): the library 48k samples/s without any checks,
this parser 141k without the CRC (``size``) and 60.5k on a record's first read with its CRC-32 (``records``).
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..checkpoint.safe_load import CheckpointFileError, read_checked_json, read_json
from ..vae.frozen import path_content_fingerprint, posterior_latents
from .cache_format import ARRAYS, FORMAT, VERSION, LatentCacheError, header_bytes, record_crcs, sha256_file
from .loaders import ResumableLoader
from .sampler import ShardSampler
from .transforms import describe_augment, sample_seed

VERIFY = ("records", "sha256", "size", "none")
_ST_DTYPES = {"F16": (np.float16, torch.float16), "BF16": (np.int16, torch.bfloat16), "I64": (np.int64, torch.int64),
              "F32": (np.float32, torch.float32), "I32": (np.int32, torch.int32)}
# |bits| >= this in the 16-bit pattern (sign masked) means inf or NaN: fp16 exponent all ones, bf16 likewise
_NONFINITE_BITS = {"fp16": 0x7C00, "bf16": 0x7F80}
# |bits| >= this in the 16-bit pattern (sign masked) means inf or NaN: fp16 exponent all ones, bf16 likewise
_NONFINITE_BITS = {"fp16": 0x7C00, "bf16": 0x7F80}


def shard_content_problem(fp: str, d: dict, sidecar: dict, verify: str, arrays) -> Optional[str]:
    """What is wrong with an opened shard ``d`` of file ``fp`` against its sidecar, or None: the CRC-32 of its index
    arrays ``arrays`` (verify "records" or "sha256") and the file's sha256 (verify "sha256"). Shared by the latent
    cache and the teacher-feature cache."""
    if verify in ("records", "sha256"):
        wrong = [a for a in arrays if zlib.crc32(d[a]) != sidecar["arrays_crc32"][a]]
        if wrong:
            return f"{fp} ({'/'.join(wrong)} array changed)"
    if verify == "sha256" and sha256_file(fp) != sidecar["sha256"]:
        return f"{fp} (sha256 mismatch)"
    return None


def _nonfinite_rows(a: np.ndarray, dtype: str) -> np.ndarray:
    """(n,) bool: rows of the 16-bit storage array ``a`` (n, ...) holding an inf or NaN."""
    if len(a) == 0:  # an empty shard (every image unreadable)
        return np.zeros(0, bool)
    bits = a.reshape(len(a), -1).view(np.uint16) & 0x7FFF
    return bits.max(axis=1, initial=0) >= _NONFINITE_BITS[dtype]

# --------------------------------------------------------------------------- reader

def _open_safetensors(path: str, header: Optional[bytes] = None, what: str = "latent cache shard"
                      ) -> Dict[str, np.ndarray]:
    """Memory-map a safetensors file once and view each tensor as a numpy array (bf16 as int16 bits).

    The header is validated as the safetensors format requires: known dtypes, each tensor's byte range matching
    its shape, the ranges contiguous and covering the rest of the file exactly. ``what`` names the file in errors."""
    header = header if header is not None else header_bytes(path, what)
    hlen = len(header) - 8
    try:
        info = json.loads(header[8:])
    except ValueError as e:
        raise LatentCacheError(f"{what} {path}: damaged header ({e})") from e
    size = os.path.getsize(path)
    entries = sorted((v["data_offsets"], k, v) for k, v in info.items() if k != "__metadata__")
    end = 0
    for (b, e), name, v in entries:
        if v.get("dtype") not in _ST_DTYPES or b != end or e < b or \
                (e - b) != int(np.prod(v["shape"])) * np.dtype(_ST_DTYPES[v["dtype"]][0]).itemsize:
            raise LatentCacheError(f"{what} {path}: tensor {name!r} has an inconsistent header entry "
                                   f"{v}; the file is damaged")
        end = e
    if 8 + hlen + end != size:
        raise LatentCacheError(f"{what} {path}: the header covers {8 + hlen + end} bytes, the file has "
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
            header = header_bytes(fp)
            if verify in ("records", "sha256") and hashlib.sha256(header).hexdigest() != sh["header_sha256"]:
                bad.append(f"{fp} (header changed)")
                continue
            d = _open_safetensors(fp, header)
            want = (sh["count"], self.views, 2) + self.latent_shape
            if set(d) != {"mean", "logvar", *ARRAYS} or d["mean"].shape != want or d["logvar"].shape != want:
                bad.append(f"{fp} (tensors {sorted(d)} of shapes {[d[k].shape for k in sorted(d)]}, expected "
                           f"mean/logvar {want})")
                continue
            problem = shard_content_problem(fp, d, sh, verify, ARRAYS)
            if problem:
                bad.append(problem)
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
              latent_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
              augment: Optional[str] = None, crop_scale_min: Optional[float] = None) -> None:
        """Raise naming every difference between the manifest and the request.

        ``augment`` / ``crop_scale_min`` (the job's ``data.augment`` / ``data.crop_scale_min``): the crop the cached
        views were made with must be the job's (compared by the transform it builds, so a crop scale that the
        augmentation does not use plays no part); views, flips and the posterior's moments are recorded in the
        manifest (every view is stored plain and flipped, with its mean and log-variance: ``data.latent_sample``
        picks the posterior at read time).

        The VAE is compared by content: ``vae_content`` (a :func:`usp_scale.vae.frozen.content_fingerprint`), or
        that of the VAE at ``vae_path`` (loaded once); folder and file names play no part."""
        m, diffs = self.manifest, []
        if image_size is not None and m["resolution"] != image_size:
            diffs.append(f"resolution: cache {m['resolution']} vs requested data.image_size={image_size}")
        if vae_version is not None and m["vae"]["version"] != vae_version:
            diffs.append(f"VAE version: cache {m['vae']['version']} vs requested vae.version={vae_version}")
        elif vae_content is not None or vae_path is not None:
            if vae_content is None:
                vae_content = path_content_fingerprint(vae_path, vae_version or m["vae"]["version"])
            if m["vae"].get("content") != vae_content:
                diffs.append(f"VAE: the cache was encoded by a VAE with content fingerprint {m['vae'].get('content')} "
                             f"(then at {m['vae']['path']!r}), vae.path={vae_path!r} holds different weights or "
                             f"architecture (fingerprint {vae_content})")
        if augment is not None and "augment" in m:
            want = describe_augment(augment, m["resolution"] if image_size is None else image_size,
                                    m["augment"].get("crop_scale_min", 0.2) if crop_scale_min is None
                                    else crop_scale_min)
            have = m["augment"]
            if (have.get("name"), have.get("repr")) != (want["name"], want["repr"]):
                scale = (f", crop scale {have.get('crop_scale_min')}-1" if have.get("name") == "pretrain" else "")
                diffs.append(f"augmentation: the cache holds {m.get('views', 1)} view(s) per image made with "
                             f"--augment {have.get('name')}{scale}, the job has data.augment={augment}"
                             + (f" (data.crop_scale_min={crop_scale_min})" if augment == "pretrain" else "")
                             + f": write a cache with --augment {augment} (launchers/cache_latents.py), or set "
                             f"data.augment={have.get('name')} if that is what you meant")
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
    ``scale``: the latent scale factor, or a :class:`~usp_scale.vae.latent_norm.LatentNorm` (VA-VAE's channel
    statistics).
    """

    def __init__(self, cache: LatentCache, sampler: ShardSampler, *, scale: float, sample: bool = True,
                 device="cpu"):
        super().__init__(sampler)
        self.cache, self.scale, self.sample, self.device = cache, scale, sample, torch.device(device)
        self._choice_epoch, self._choice = None, None
        # batch key -> a reader with gather(positions, views, flips) -> (n, ...) over this cache's records (REPA's
        # teacher-feature cache: usp_scale.data.teacher_cache); each batch gets the records of its latents' crops
        self.record_features: dict = {}

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
            batch = {"latents": z, "labels": labels.to(self.device, non_blocking=pin),
                     "index": index.to(self.device, non_blocking=pin),
                     "view": torch.from_numpy(c // 2).to(self.device), "flip": torch.from_numpy(c % 2).to(self.device)}
            for key, reader in self.record_features.items():
                batch[key] = reader.gather(idx, c // 2, c % 2).to(self.device, non_blocking=pin)
            yield batch
