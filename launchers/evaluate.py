#!/usr/bin/env python
"""FID / IS / KID / precision-recall of generated images against a reference, via torch-fidelity.

Examples
  python launchers/evaluate.py --samples samples/dit-xl/samples_50000x256x256x3.npz \
      --reference VIRTUAL_imagenet256_labeled.npz --inception-weights /weights/ --metrics fid is pr
  python launchers/evaluate.py --samples samples/run1 --reference data/synthetic/val --feature-extractor usp-tiny
  python launchers/evaluate.py --save-stats ref_stats.npz --reference data/val --inception-weights /weights/

Every number is written (JSON lines in --out, readable lines beside it) with the metric name, sample
count, sampler, steps, guidance, sampling precision, reference and feature extractor. Sampler settings
default to the samples folder's sampling.json (written by launchers/sample.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", default=None, help="generated images: a folder of PNG/JPEG or an ADM .npz (arr_0)")
    p.add_argument("--reference", default=None, help="reference: folder, image .npz (arr_0) or statistics .npz "
                   "(mu, sigma; e.g. VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--metrics", nargs="+", default=["fid", "is"], choices=["fid", "sfid", "is", "kid", "pr"],
                   help="metrics to compute (sfid = FID on Inception's spatial mixed_6/conv features, as ADM; pr = precision "
                        "and recall, k-NN with k = --pr-k)")
    p.add_argument("--feature-extractor", default="inception-v3-compat",
                   help="torch-fidelity extractor name ('usp-tiny' = small test extractor, no weights needed)")
    p.add_argument("--inception-weights", default=None,
                   help="local weights-inception-2015-12-05-6726825d.pth (file or its folder); nothing is downloaded")
    p.add_argument("--batch-size", type=int, default=64, help="images per feature-extraction batch")
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    p.add_argument("--cache-dir", default=None, help="reference feature cache (default $USP_SCALE_CACHE or "
                   "~/.cache/usp_scale/eval)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at the sample count)")
    p.add_argument("--pr-k", type=int, default=3, help="k of the k-NN manifolds for precision/recall")
    p.add_argument("--out", default=None, help="JSON-lines results file (default: <samples folder>/metrics.jsonl)")
    p.add_argument("--save-stats", default=None, help="only compute the reference's FID statistics (mu, sigma; "
                   "and mu_s, sigma_s for sFID) and write them to this .npz")
    g = p.add_argument_group("context written with every number (default: from the samples' sampling.json)")
    g.add_argument("--sampler", default=None, help="sampler used to make the samples")
    g.add_argument("--steps", default=None, help="sampling steps")
    g.add_argument("--cfg-scale", type=float, default=None, help="guidance scale used")
    g.add_argument("--sampling-precision", default=None, help="precision the samples were made in")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _sampling_meta(samples: str) -> dict:
    folder = samples if os.path.isdir(samples) else os.path.dirname(os.path.abspath(samples))
    path = os.path.join(folder, "sampling.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def main(argv: Optional[list] = None) -> list:
    args = build_parser().parse_args(argv)
    import torch
    from usp_scale.eval import (compute_metrics, create_extractor, default_layer, format_record, make_records,
                                reference_features, save_statistics, write_records)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.save_stats:
        if not args.reference:
            raise SystemExit("--save-stats needs --reference (images to summarise)")
        layer = default_layer(args.feature_extractor, "fid")
        try:                                      # sFID statistics too where the extractor has spatial features
            spatial = default_layer(args.feature_extractor, "sfid")
        except KeyError:
            spatial = None
        ext = create_extractor(args.feature_extractor, [layer] + ([spatial] if spatial else []), device,
                               args.inception_weights)
        feats = reference_features(args.reference, ext, args.feature_extractor, args.batch_size, device,
                                   args.cache_dir, progress=not args.no_progress)
        path = save_statistics(args.save_stats, feats[layer], feats[spatial] if spatial else None)
        print(f"wrote {path} ({feats[layer].shape[0]} images, {args.feature_extractor}:{layer}"
              f"{f' and {spatial} (mu_s, sigma_s)' if spatial else ''})")
        return []
    if not args.samples:
        raise SystemExit("--samples is required (or use --save-stats)")
    results = compute_metrics(args.samples, args.reference, args.metrics, args.feature_extractor,
                              args.inception_weights, device, args.batch_size, args.cache_dir,
                              kid_subset_size=args.kid_subset_size, pr_k=args.pr_k, progress=not args.no_progress)
    meta = _sampling_meta(args.samples)
    context = {
        "sampler": args.sampler or meta.get("sampler", "unknown"),
        "steps": args.steps or meta.get("steps", "unknown"),
        "cfg_scale": args.cfg_scale if args.cfg_scale is not None else meta.get("cfg_scale", "unknown"),
        "sampling_precision": args.sampling_precision or meta.get("sampling_precision", "unknown"),
        "reference": args.reference,
        "feature_extractor": args.feature_extractor,
        "samples": os.path.abspath(args.samples),
    }
    records = make_records(results, context)
    out = args.out or os.path.join(args.samples if os.path.isdir(args.samples)
                                   else os.path.dirname(os.path.abspath(args.samples)), "metrics.jsonl")
    write_records(out, records)
    for r in records:
        print(format_record(r))
    print(f"results appended to {out}")
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
