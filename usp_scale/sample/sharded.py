"""Sharded, resumable sampling where every image is a function of (seed, index) only.

Each sample index owns a CPU ``torch.Generator`` seeded from (seed, index). It draws, in order: the
class label, the initial noise z, then every noise tensor the sampler asks for. Rank r of W takes
indices r, r+W, r+2W, ... so any world size (and any batch size) yields the same images, up to the
model's own batch-size-dependent rounding. Noise is drawn on the CPU and moved to the device,
so it does not depend on the device type either.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..runtime import barrier, get_rank, get_world_size
from ..fileio import write_json
from .io import make_grid, png_path, read_png, write_npz, write_png

META_FILE = "sampling.json"


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a job seeded ``seed`` (SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> 1)


class IndexedNoise:
    """Per-sample random streams for a batch of sample indices."""

    def __init__(self, indices: Sequence[int], seed: int, device: torch.device | str = "cpu"):
        self.indices = [int(i) for i in indices]
        self.device = torch.device(device)
        self.gens = [torch.Generator().manual_seed(derive_seed(seed, i)) for i in self.indices]

    def labels(self, num_classes: int, mode: str = "random") -> torch.Tensor:
        """(N,) labels: ``random`` = uniform from each index's stream (drawn even when unconditional,
        so the stream layout is fixed); ``balanced`` = index % num_classes."""
        drawn = [int(torch.randint(0, max(num_classes, 1), (1,), generator=g)) for g in self.gens]
        if mode == "balanced":
            drawn = [i % num_classes for i in self.indices]
        elif mode != "random":
            raise ValueError(f"label mode {mode!r}: expected 'random' or 'balanced'")
        return torch.tensor(drawn, dtype=torch.long, device=self.device)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """(N, *shape) standard normal, row i from stream i."""
        rows = torch.stack([torch.randn(tuple(shape), generator=g) for g in self.gens])
        if self.device.type == "cuda":  # pinned + non_blocking: no host sync with the GPU stream
            return rows.pin_memory().to(self.device, non_blocking=True)
        return rows.to(self.device)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        """Noise shaped like ``like`` (N, ...) in its dtype and device (a sampler's ``noise_fn``)."""
        if like.shape[0] != len(self.gens):
            raise ValueError(f"noise for {like.shape[0]} rows requested from {len(self.gens)} streams")
        return self.randn(like.shape[1:]).to(device=like.device, dtype=like.dtype)


def generate_batches(model: Callable, sampler: Callable, decode: Callable[[torch.Tensor], torch.Tensor],
                     indices: Sequence[int], *, seed: int, latent_shape: Sequence[int], num_classes: int,
                     batch_size: int, device: torch.device | str = "cpu", labels: str = "random",
                     progress_bar=None) -> Iterator[Tuple[List[int], np.ndarray, torch.Tensor]]:
    """Yield (indices, uint8 images [n, H, W, 3], labels) batch by batch for the given indices."""
    device = torch.device(device)
    for start in range(0, len(indices), batch_size):
        idx = list(indices[start:start + batch_size])
        noise = IndexedNoise(idx, seed, device)
        y = noise.labels(num_classes, labels)
        z = noise.randn(latent_shape)
        with torch.no_grad():
            lat = sampler(model, z, y, noise)
            images = decode(lat).cpu().numpy()
        if progress_bar is not None:
            progress_bar.update(len(idx))
        yield idx, images, y.cpu()


def _check_meta(out_dir: str, meta: dict) -> None:
    """Refuse to mix images of different jobs in one folder."""
    path = os.path.join(out_dir, META_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        for k, v in meta.items():
            if k in old and old[k] != v:
                why = {"ckpt_content": f" (the weights file {meta.get('ckpt')} was replaced since these samples "
                                       "were made)",
                       "vae_content": " (the VAE's weights changed since these samples were made)"}.get(k, "")
                raise ValueError(f"{path}: existing samples were made with {k}={old[k]!r}, this job has {v!r}{why}. "
                                 "Use a new output folder, or delete the old samples to start over")


def run_sampling(model: Callable, sampler: Callable, decode: Callable[[torch.Tensor], torch.Tensor], *,
                 num_samples: int, out_dir: str, latent_shape: Sequence[int], num_classes: int, seed: int = 0,
                 batch_size: int = 64, device: torch.device | str = "cpu", labels: str = "random",
                 rank: Optional[int] = None, world_size: Optional[int] = None, meta: Optional[dict] = None,
                 write_pngs: bool = True, npz: bool = True, grid: int = 64, progress: bool = True,
                 max_batches: Optional[int] = None) -> dict:
    """Sample indices 0..num_samples-1 into ``out_dir`` as ``{index:06d}.png``, skipping indices whose PNG
    exists (restart), then (rank 0, once all exist) the ADM ``.npz`` and ``grid.png``.

    ``max_batches`` stops this rank after that many batches (a time-limited job; rerun to continue).
    Returns counts, paths and throughput."""
    if rank is None or world_size is None:
        rank, world_size = get_rank(), get_world_size()
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(meta or {})
    meta.update(num_samples=num_samples, seed=seed, labels=labels, latent_shape=list(latent_shape))
    _check_meta(out_dir, meta)  # every rank checks (and raises together) before rank 0 rewrites the file
    barrier()
    if rank == 0:
        write_json(os.path.join(out_dir, META_FILE), meta, indent=1, sort_keys=True)
    mine = list(range(rank, num_samples, world_size))
    todo = [i for i in mine if not os.path.exists(png_path(out_dir, i))]
    skipped = len(mine) - len(todo)
    if max_batches is not None:
        todo = todo[: max_batches * batch_size]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), unit="img", desc=f"sampling (rank 0 of {world_size})", dynamic_ncols=True)
    t0 = time.perf_counter()
    written = 0
    # PNG encoding runs on writer threads while the next batch samples; at most two batches in flight.
    pending: list = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for idx, images, _ in generate_batches(model, sampler, decode, todo, seed=seed, latent_shape=latent_shape,
                                               num_classes=num_classes, batch_size=batch_size, device=device,
                                               labels=labels, progress_bar=bar):
            if write_pngs:
                while len(pending) > 2 * batch_size:
                    pending.pop(0).result()
                pending.extend(pool.submit(write_png, png_path(out_dir, i), im) for i, im in zip(idx, images))
            written += len(idx)
        for f in pending:
            f.result()  # re-raises a failed write
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    barrier()
    result = {"rank": rank, "world_size": world_size, "written": written, "skipped": skipped, "seconds": seconds,
              "images_per_s": written / seconds if seconds > 0 else float("nan"), "npz": None, "grid": None}
    missing = [i for i in range(num_samples) if not os.path.exists(png_path(out_dir, i))]
    result["missing"] = len(missing)
    if rank == 0 and not missing:
        if npz:
            result["npz"] = assemble_npz(out_dir, num_samples, progress=progress)
        if grid:
            ims = np.stack([read_png(png_path(out_dir, i)) for i in range(min(grid, num_samples))])
            result["grid"] = os.path.join(out_dir, "grid.png")
            write_png(result["grid"], make_grid(ims, nrow=int(np.ceil(np.sqrt(len(ims))))))
    return result


def assemble_npz(out_dir: str, num_samples: int, path: Optional[str] = None, progress: bool = True) -> str:
    """Read ``{i:06d}.png`` for i < num_samples into one ADM ``.npz`` (arr_0 uint8 [N, H, W, 3])."""
    first = read_png(png_path(out_dir, 0))
    arr = np.empty((num_samples, *first.shape), dtype=np.uint8)

    def load(i: int) -> None:
        im = read_png(png_path(out_dir, i))
        if im.shape != first.shape:
            raise ValueError(f"{png_path(out_dir, i)} is {im.shape}, expected {first.shape}")
        arr[i] = im
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=num_samples, desc="npz", unit="img", leave=False)
    with ThreadPoolExecutor(max_workers=8) as pool:  # PIL decodes without the GIL
        for _ in pool.map(load, range(num_samples)):
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    h, w = first.shape[:2]
    path = path or os.path.join(out_dir, f"samples_{num_samples}x{h}x{w}x3.npz")
    return write_npz(path, arr)
