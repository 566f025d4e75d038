#!/usr/bin/env python3
"""REPA's teacher targets: the teacher-feature cache (size per image, read rate) against running the teacher online
(DINOv2-B forward GFLOP per image, its share of a SiT-XL/2 training step, and its measured forward time here).

Writes a markdown report (machine, versions, date, settings, numbers). Example:
    python benchmarks/data/bench_teacher_cache.py --images 1024 \
        --out benchmarks/reports/teacher_cache_cpu_$(date +%F).md

The cache is written by the cache's own shard writer and manifest writer (usp_scale.data.teacher_cache) with
random bf16 tokens of DINOv2-B's shape (256 x 768 per record, plain + flipped, one view, shards of 256 images):
the format on disk and the reader are the real ones; what the tokens hold does not change their size or the read
path. Read rates are for batches of --batch random (position, flip) draws, page cache warm, one thread, median of
--repeats, for the reader's integrity modes; the first-read number includes every record's CRC-32.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loader import machine  # noqa: E402

IMAGENET = 1_281_167


def write_cache(folder: str, images: int, shard_size: int, tokens: int, dim: int) -> dict:
    from usp_scale.data.teacher_cache import _write_shard, write_teacher_manifest

    shards = -(-images // shard_size)
    settings = {"crop_set": {"benchmark": "random tokens", "shards": [[min(shard_size, images - s * shard_size), 0]
                                                                        for s in range(shards)]},
                "teacher": {"name": "random", "content": "none"}, "dtype": "bf16", "tokens": tokens, "dim": dim,
                "views": 1, "flips": True}
    g = torch.Generator().manual_seed(0)
    for s in range(shards):
        n = min(shard_size, images - s * shard_size)
        feats = (torch.randn((n, 1, 2, tokens, dim), generator=g) * 2).to(torch.bfloat16)
        _write_shard(folder, s, feats, np.arange(s * shard_size, s * shard_size + n), settings)
    return write_teacher_manifest(folder)


def read_rate(cache, batch: int, repeats: int, fresh: bool) -> float:
    """Median samples/s of gather() over random batches; ``fresh``: forget which records were verified before each
    batch (every record's first read), else verify every record once before timing (a later epoch)."""
    rng = np.random.default_rng(0)
    if not fresh:
        for f in range(cache.flips):
            for lo in range(0, len(cache), batch):
                idx = np.arange(lo, min(lo + batch, len(cache)))
                cache.gather(idx, np.zeros(len(idx), np.int64), np.full(len(idx), f))
    rates = []
    for _ in range(repeats + 1):
        if fresh:
            for v in cache._verified:
                v[:] = False
        idx = rng.integers(0, len(cache), batch)
        flip = rng.integers(0, 2, batch)
        t = time.perf_counter()
        out = cache.gather(idx, np.zeros(batch, np.int64), flip)
        rates.append(batch / (time.perf_counter() - t))
        assert out.shape[0] == batch
    return statistics.median(rates[1:])                       # the first draw warms the page cache and code


def teacher_forward_s(batch: int) -> float:
    from usp_scale.models.teacher import TEACHERS, DINOv2ViT

    net = DINOv2ViT(TEACHERS["dinov2_vitb14"], grid=16).eval()
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        net(x[:1])
        t = time.perf_counter()
        net(x)
    return (time.perf_counter() - t) / batch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024, help="images in the benchmark cache (x2 records: flips)")
    ap.add_argument("--shard-size", type=int, default=256, help="images per shard")
    ap.add_argument("--batch", type=int, default=256, help="samples per gather (REPA's global batch is 256)")
    ap.add_argument("--repeats", type=int, default=7, help="timed gathers per mode (median)")
    ap.add_argument("--teacher-batch", type=int, default=4, help="images in the timed DINOv2-B forward (0: skip)")
    ap.add_argument("--dir", default=None, help="where to write the cache (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="markdown report path (default: print)")
    args = ap.parse_args(argv)

    from usp_scale.data.teacher_cache import TeacherFeatureCache
    from usp_scale.models import create_model
    from usp_scale.models.teacher import TEACHERS, DINOv2ViT

    tokens, dim = 256, 768
    info = machine()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        t = time.perf_counter()
        m = write_cache(folder, args.images, args.shard_size, tokens, dim)
        write_s = time.perf_counter() - t
        total = sum(sh["bytes"] for sh in m["shards"])
        per_image = total / args.images
        per_record = per_image / 2
        t = time.perf_counter()
        cache = TeacherFeatureCache(folder, verify="records")
        open_ms = (time.perf_counter() - t) * 1e3
        modes = [("records (default), first read: CRC-32 + finiteness of every record", "records", True),
                 ("records, records already verified (finiteness only)", "records", False),
                 ("size (no CRC): finiteness only", "size", False)]
        for label, verify, fresh in modes:
            c = cache if verify == "records" else TeacherFeatureCache(folder, verify=verify)
            r = read_rate(c, args.batch, args.repeats, fresh)
            rows.append((f"teacher cache reader, 1 thread, batch {args.batch} of random (image, flip), "
                         f"{args.images} images, page cache warm, verify={label}", f"{r:,.0f} samples/s "
                         f"({r * per_record / 1e6:,.0f} MB/s of tokens)"))
    sec = teacher_forward_s(args.teacher_batch) if args.teacher_batch else float("nan")

    with torch.device("meta"):
        teacher = DINOv2ViT(TEACHERS["dinov2_vitb14"], grid=16)
        sit = create_model("SiT-XL/2", device="meta")
        repa = create_model("SiT-XL/2-REPA", device="meta")
    t_gf = teacher.flops_per_image() / 1e9
    sit_fwd = sit.flops_per_sample() / 1e9
    sit_step = 3 * sit_fwd
    proj_step = 3 * (repa.flops_per_sample() / 1e9 - create_model("SiT-XL/2", device="meta", learn_sigma=False)
                     .flops_per_sample() / 1e9)
    inet = per_image * IMAGENET

    lines = [f"# REPA teacher targets: cache vs online ({info['date'][:10]})", "", "| item | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", f"Command: `bench_teacher_cache.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
              "| measurement | value |", "|---|---|",
              f"| record: {tokens} tokens x {dim} bf16 | {tokens * dim * 2:,} bytes |",
              f"| on disk per image, plain + flipped (shards incl. headers, index, CRCs) | {per_image:,.0f} bytes "
              f"({per_image / 1e6:.3f} MB) |",
              f"| on disk per image without flips (REPA's own preprocessing has none) | {per_record:,.0f} bytes |",
              f"| ImageNet-1k train ({IMAGENET:,} images), plain + flipped | {inet / 1e12:.2f} TB |",
              f"| ImageNet-1k train, without flips | {inet / 2e12:.2f} TB |",
              f"| write ({args.images} images, random tokens, shard writer + manifest) | {write_s:.1f} s |",
              f"| open ({total / 2**20:,.0f} MiB, verify=records) | {open_ms:.1f} ms |"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    lines += [f"| DINOv2-B/14 forward at 224 px (257 tokens), matmul FLOPs | {t_gf:.1f} GFLOP/image |",
              f"| SiT-XL/2 forward (256 tokens) / training step (3x forward) | {sit_fwd:.1f} / {sit_step:.1f} "
              f"GFLOP/image |",
              f"| REPA projector, training (3x forward; 1152 -> 2048 -> 2048 -> 768 on 256 tokens) | "
              f"{proj_step:.1f} GFLOP/image |",
              f"| online teacher / SiT-XL/2 step | {100 * t_gf / sit_step:.1f} % (teacher + projector: "
              f"{100 * (t_gf + proj_step) / sit_step:.1f} %) |",
              f"| cached targets at 700 img/s/GPU (the SiT-XL/2 rate of the design notes) | "
              f"{700 * per_record / 1e6:.0f} MB/s per GPU of reads, no teacher FLOPs |"]
    if args.teacher_batch:
        lines.append(f"| DINOv2-B/14 forward measured here, fp32, batch {args.teacher_batch}, this CPU | "
                     f"{sec:.2f} s/image ({t_gf / sec:.0f} GFLOP/s) |")
    text = "\n".join(lines) + "\n"
    if args.out:
        from usp_scale.fileio import write_text
        write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
