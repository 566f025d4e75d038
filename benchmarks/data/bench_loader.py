#!/usr/bin/env python3
"""Data-path throughput: image loaders (torchvision/PIL, DALI CPU, DALI mixed on a GPU), VAE encode, cache reader.

Writes a markdown report (machine, versions, date, settings, images/s). Example:
    python benchmarks/data/bench_loader.py --images 512 --out benchmarks/reports/data_loader_cpu_$(date +%F).md
Without --data-root a synthetic ImageNet-like set (JPEG, short side --src-size, aspect up to 4/3) is written
to a temporary folder first. Timings exclude a warm-up pass; every number is the median of --repeats.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": f"{cpu} ({os.cpu_count()} logical cores visible)", "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}
    import PIL
    import torchvision
    info["torchvision"], info["pillow"] = torchvision.__version__, PIL.__version__
    try:
        import nvidia.dali
        info["dali"] = nvidia.dali.__version__
    except ImportError:
        info["dali"] = "not installed"
    import diffusers
    info["diffusers"] = diffusers.__version__
    try:
        info["load_avg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return info


def timed(fn, repeats: int):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        ts.append((time.perf_counter() - t, n))
    med = statistics.median(n / t for t, n in ts)
    return med


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_images(root, backend, augment, size, batch, workers, device, repeats, dali_device="auto"):
    from usp_scale.config import DataConfig
    from usp_scale.data import build_image_loader
    cfg = DataConfig(root=root, image_size=size, batch_size=batch, num_workers=workers, loader=backend,
                     augment=augment, dali_device=dali_device, drop_last=True)
    ld = build_image_loader(cfg, train=True, device=device)

    def run():
        n = 0
        for b in ld:
            n += len(b["labels"])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return n
    return timed(run, repeats)


def bench_vae(path, size, batch, dtype, device, repeats, compile_=False, channels_last=True):
    from usp_scale.vae import FrozenVAE
    vae = FrozenVAE(path=path, dtype=dtype, device=device, compile=compile_, channels_last=channels_last)
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1

    def run():
        vae.encode_moments(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return batch
    return timed(run, repeats)


def bench_reader(tmp, n_images, views, batch, repeats, mode="sample", verify="records", first_read=True):
    """mode: "gather" (only the CPU part when training on a GPU: index, pick view/flip, copy fp16 moments, and the
    per-record CRC and finiteness checks of ``verify``), "mean" or "sample" (the whole loader on the CPU device,
    including the fp32 math and the noise), "st-slice" (the same gather through the safetensors library's
    memory-mapped ``safe_open(...).get_slice`` reader, one slice per record, no checks: for comparison)."""
    from usp_scale.data.cache_format import write_manifest, write_shard
    out = os.path.join(tmp, "cache")
    if os.path.isfile(os.path.join(out, "manifest.json")):
        return _time_reader(out, batch, repeats, mode, verify, first_read)
    os.makedirs(out, exist_ok=True)
    shard = 2500
    lat = [4, 28, 28]
    settings = {"num_source_images": n_images, "shard_size": shard, "views": views, "seed": 0, "dtype": "fp16",
                "resolution": 224, "augment": {"name": "pretrain"}, "vae": {"version": "d8", "name": "bench"},
                "latent_shape": lat, "dataset": {"root": "synthetic moments", "num_classes": 1000}}
    g = torch.Generator().manual_seed(0)
    for s in range(-(-n_images // shard)):
        m = min(shard, n_images - s * shard)
        mean = torch.randn(m, views, 2, *lat, generator=g).half()
        logvar = (torch.randn(m, views, 2, *lat, generator=g) - 4).half()
        write_shard(out, s, [mean], [logvar], [torch.randint(0, 1000, (m,), generator=g)],
                    [torch.arange(s * shard, s * shard + m)], [], settings)
    write_manifest(out)
    return _time_reader(out, batch, repeats, mode, verify, first_read)


def _st_slice_gather(cache):
    """gather() through safetensors' own memory-mapped reader: one get_slice call per record and array."""
    from safetensors import safe_open
    handles = [safe_open(f, framework="np") for f in cache.files]
    slices = [{k: h.get_slice(k) for k in ("mean", "logvar", "index")} for h in handles]

    def gather(idx, view, flip):
        sh = np.searchsorted(cache.offsets, idx, side="right") - 1
        mean = np.empty((len(idx),) + cache.latent_shape, np.float16)
        logvar = np.empty_like(mean)
        for j, (s, i, v, f) in enumerate(zip(sh, idx - cache.offsets[sh], view, flip)):
            sl = slices[s]
            mean[j] = sl["mean"][i:i + 1, v:v + 1, f:f + 1].reshape(cache.latent_shape)
            logvar[j] = sl["logvar"][i:i + 1, v:v + 1, f:f + 1].reshape(cache.latent_shape)
        return mean, logvar, cache.labels[torch.from_numpy(idx)]
    return gather


def _time_reader(out, batch, repeats, mode, verify="records", first_read=True):
    from usp_scale.data.cache_reader import LatentCache, LatentCacheLoader
    from usp_scale.data.sampler import ShardSampler
    cache = LatentCache(out, verify=verify)
    sampler = ShardSampler(len(cache), 0, 1, 0, batch_size=batch)
    ld = LatentCacheLoader(cache, sampler, scale=0.18215, sample=mode == "sample")
    gather = _st_slice_gather(cache) if mode == "st-slice" else cache.gather

    def run():
        n = 0
        if first_read:  # forget which records were verified: every record read is CRC-checked (the first epoch)
            cache._verified = [np.zeros_like(v) for v in cache._verified]
        if mode in ("gather", "st-slice"):
            choice = ld._choices()
            for bt in sampler.batches():
                idx = np.asarray(bt, np.int64)
                c = choice[idx]
                n += len(gather(idx, c // 2, c % 2)[2])
            return n
        for b in ld:
            n += len(b["labels"])
        return n
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one data-loading thread, as beside a training process
    try:
        return timed(run, repeats)
    finally:
        torch.set_num_threads(threads)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="", help="ImageFolder root with train/ (default: write a synthetic set)")
    p.add_argument("--images", type=int, default=512, help="synthetic train images (default 512)")
    p.add_argument("--src-size", type=int, default=320, help="synthetic short side in pixels (default 320)")
    p.add_argument("--size", type=int, default=224, help="crop size (default 224)")
    p.add_argument("--batch", type=int, default=64, help="loader batch size (default 64)")
    p.add_argument("--workers", type=int, default=2, help="torchvision workers / DALI threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the median is reported (default 3)")
    p.add_argument("--vae", default="sd-random", help="VAE path for the encode benchmark (default sd-random: the "
                                                       "SD-VAE architecture with random weights)")
    p.add_argument("--vae-batch", type=int, default=8, help="VAE encode batch (default 8; 128 on a GPU)")
    p.add_argument("--vae-dtypes", default="fp32,bf16", help="comma-separated VAE precisions (default fp32,bf16)")
    p.add_argument("--reader-images", type=int, default=20000, help="images in the synthetic latent cache")
    p.add_argument("--reader-batch", type=int, default=256, help="cache reader batch size (default 256)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: loaders,vae,reader")
    p.add_argument("--out", default="", help="also write the report to this markdown file")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    skip = set(filter(None, a.skip.split(",")))
    info = machine()
    lines = ["# Data-path throughput", "", "| item | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", f"Command: `{' '.join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:]))}`", ""]
    rows = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = a.data_root
        if not root and "loaders" not in skip:
            from usp_scale.data.synthetic import make_synthetic
            classes = 16
            make_synthetic(tmp + "/syn", classes=classes, per_class=max(1, a.images // classes), size=a.src_size,
                           val_per_class=1, seed=0, max_aspect=4 / 3)
            root = tmp + "/syn"
        if "loaders" not in skip:
            from usp_scale.data.dali import dali_available
            runs = [("torchvision", "pretrain", "cpu", "-"), ("torchvision", "eval", "cpu", "-")]
            if dali_available():
                runs += [("dali", "pretrain", "cpu", "cpu"), ("dali", "eval", "cpu", "cpu")]
                if device == "cuda":
                    runs += [("dali", "pretrain", "cuda", "mixed"), ("dali", "eval", "cuda", "mixed")]
            for backend, aug, dev, dd in runs:
                ips = bench_images(root, backend, aug, a.size, a.batch, a.workers, dev, a.repeats,
                                   dali_device=dd if dd != "-" else "auto")
                rows.append((f"loader {backend} ({'decode ' + dd if dd != '-' else 'PIL'}), {aug} crop {a.size}, "
                             f"{a.workers} workers/threads, batch {a.batch}", f"{ips:,.0f} img/s"))
                print(rows[-1], flush=True)
        if "vae" not in skip:
            for dt in a.vae_dtypes.split(","):
                ips = bench_vae(a.vae, a.size, a.vae_batch, dt, device, a.repeats)
                rows.append((f"VAE encode ({a.vae}, {dt}, channels_last, {device}), {a.size}px, batch {a.vae_batch}",
                             f"{ips:,.1f} img/s"))
                print(rows[-1], flush=True)
        if "reader" not in skip:
            what = {"gather": "CPU part only (index + view/flip pick + fp16 copy; the math runs on the GPU)",
                    "mean": "whole loader on the CPU, posterior mean x scale (fp32)",
                    "sample": "whole loader on the CPU, posterior sample x scale (fp32 noise on the CPU)",
                    "st-slice": "CPU part through safetensors' safe_open get_slice (one slice per record)"}
            checks = {("records", True): "data.latent_verify=records (default), first read: CRC-32 + finiteness of "
                                         "every record",
                      ("records", False): "data.latent_verify=records, records already verified (a later epoch "
                                          "drawing the same views): finiteness only",
                      ("size", True): "data.latent_verify=size (no CRC): finiteness only"}
            for mode, verify, first in (("gather", "records", True), ("gather", "records", False),
                                        ("gather", "size", True), ("st-slice", "size", True),
                                        ("mean", "records", True), ("sample", "records", True)):
                ips = bench_reader(tmp, a.reader_images, 4, a.reader_batch, a.repeats, mode, verify, first)
                what_mode = what[mode] + ("" if mode == "st-slice" else f", {checks[(verify, first)]}")
                rows.append((f"latent cache reader, 1 thread, 4x28x28 fp16, 4 views x 2 flips, batch "
                             f"{a.reader_batch}, {a.reader_images} cached images, page cache warm: {what_mode}",
                             f"{ips:,.0f} samples/s"))
                print(rows[-1], flush=True)
            from usp_scale.data.cache_reader import LatentCache
            size = sum(os.path.getsize(os.path.join(tmp, "cache", f)) for f in os.listdir(os.path.join(tmp, "cache")))
            for verify in ("records", "sha256"):
                t = statistics.median(_seconds(lambda v=verify: LatentCache(os.path.join(tmp, "cache"), verify=v))
                                      for _ in range(a.repeats))
                rows.append((f"latent cache open ({size / 2**20:,.0f} MiB, page cache warm), "
                             f"data.latent_verify={verify}", f"{t * 1e3:,.1f} ms"))
                print(rows[-1], flush=True)
    lines += ["| measurement | median throughput |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    report = "\n".join(lines) + "\n"
    print(report)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
