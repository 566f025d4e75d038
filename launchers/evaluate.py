#!/usr/bin/env python
"""IS, FID, sFID, precision and recall of generated images against a reference, as the ADM evaluator computes
them (the numbers papers report), or under torch-fidelity's protocol; KID too under the latter.

Examples
  # the paper's table: ADM's reference batch and its own Inception graph, both local files
  python launchers/evaluate.py --samples samples/dit-xl/samples_50000x256x256x3.npz \
      --reference VIRTUAL_imagenet256_labeled.npz --inception-graph classify_image_graph_def.pb
  python launchers/evaluate.py --samples samples/run1 --reference data/synthetic/val --feature-extractor usp-synthetic
  python launchers/evaluate.py --save-stats ref_stats.npz --reference data/val --inception-weights /weights/

Protocols (--protocol; docs/sampling.md): "adm" = the ADM evaluator's definitions (IS in ordered chunks of
5,000, fp16 k-NN distances for precision/recall, the reference batch's own statistics); "torch-fidelity" =
torch-fidelity's; "auto" (default) = adm for the Inception network against an ADM reference batch (an .npz with
mu, sigma, mu_s, sigma_s), torch-fidelity otherwise. Under adm the results are printed as ADM prints them
(Inception Score, FID, sFID, Precision, Recall, in that order).

Every number is appended (JSON lines in --out, readable lines beside it) with its protocol, the sample count,
sampler, steps, guidance, sampling precision, reference and feature extractor; the sampler settings default to
the samples folder's sampling.json (written by launchers/sample.py). Every input is checked before any feature
is computed: a bad file is refused with one line naming it and nothing is printed or written.

Exit codes: 0 done; 2 bad command line or input (missing, damaged or wrong file; nothing written); 1 a crash.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

EXIT_OK, EXIT_CRASH, EXIT_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", default=None, help="generated images: a folder of PNG/JPEG or an ADM .npz (arr_0 "
                   "uint8 [N, H, W, 3])")
    p.add_argument("--reference", default=None, help="reference: folder, image .npz (arr_0) or statistics .npz "
                   "(mu, sigma[, mu_s, sigma_s][, arr_0]; e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--protocol", default="auto", choices=["auto", "adm", "torch-fidelity"],
                   help="metric definitions: adm (the ADM evaluator's), torch-fidelity, or auto (adm for Inception "
                        "against an ADM reference batch, else torch-fidelity)")
    p.add_argument("--metrics", nargs="+", default=None, choices=["fid", "sfid", "is", "kid", "pr"],
                   help="metrics to compute (sfid = FID on Inception's mixed_6/conv features, as ADM; pr = precision "
                        "and recall, k-NN with k = --pr-k). Default: is fid sfid pr under adm, fid is otherwise")
    p.add_argument("--feature-extractor", default="inception-v3-compat",
                   help="'inception-v3-compat' (the Inception network), 'usp-synthetic' (the synthetic dataset's), "
                        "'usp-tiny' (a small random net for tests: its numbers say nothing about images) or another "
                        "registered torch-fidelity extractor")
    p.add_argument("--inception-graph", default=None,
                   help="the ADM evaluator's classify_image_graph_def.pb (read directly, no TensorFlow)")
    p.add_argument("--inception-weights", default=None,
                   help="Inception weights instead of the graph: torch-fidelity's "
                        "weights-inception-2015-12-05-6726825d.pth (file or its folder) or a conversion written by "
                        "python -m usp_scale.eval.inception_graph convert; nothing is downloaded")
    p.add_argument("--batch-size", type=int, default=64, help="images per feature-extraction batch")
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    p.add_argument("--cache-dir", default=None, help="reference feature cache (default $USP_SCALE_CACHE or "
                   "~/.cache/usp_scale/eval)")
    p.add_argument("--is-split-size", type=int, default=5000,
                   help="adm protocol: IS chunk size (ADM: 5,000; the samples must fill at least one chunk)")
    p.add_argument("--is-splits", type=int, default=10, help="torch-fidelity protocol: number of IS splits")
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
        try:
            with open(path) as f:
                return json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    return {}


def main(argv: Optional[list] = None) -> list:
    """Run the evaluation; returns the records written (raises on bad input: see :func:`cli`)."""
    args = build_parser().parse_args(argv)
    if args.inception_graph and args.inception_weights:
        raise ValueError("give --inception-graph or --inception-weights, not both")
    weights = args.inception_graph or args.inception_weights
    if args.inception_graph and not os.path.isfile(args.inception_graph):
        raise FileNotFoundError(f"--inception-graph {args.inception_graph}: not found")
    import torch
    from usp_scale.eval import (compute_metrics, create_extractor, default_layer, format_record, make_records,
                                reference_features, save_statistics, write_records)
    from usp_scale.eval.features import is_inception
    from usp_scale.eval.metrics import check_image_source, format_adm
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    progress = not args.no_progress
    if args.save_stats:
        if not args.reference:
            raise ValueError("--save-stats needs --reference (images to summarise)")
        check_image_source(args.reference, "reference")
        protocol = args.protocol
        if protocol == "auto":
            protocol = "adm" if is_inception(args.feature_extractor) else "torch-fidelity"
        layer = default_layer(args.feature_extractor, "fid")
        try:                                      # sFID statistics too where the extractor has spatial features
            spatial = default_layer(args.feature_extractor, "sfid")
        except KeyError:
            spatial = None
        ext = create_extractor(args.feature_extractor, [layer] + ([spatial] if spatial else []), device, weights,
                               protocol=protocol)
        name = ext.get_name() if protocol == "adm" and is_inception(args.feature_extractor) else args.feature_extractor
        feats = reference_features(args.reference, ext, name, args.batch_size, device, args.cache_dir,
                                   progress=progress)
        path = save_statistics(args.save_stats, feats[layer], feats[spatial] if spatial else None)
        print(f"wrote {path} ({feats[layer].shape[0]} images, {args.feature_extractor}:{layer}"
              f"{f' and {spatial} (mu_s, sigma_s)' if spatial else ''}, {protocol} protocol)")
        return []
    if not args.samples:
        raise ValueError("--samples is required (or use --save-stats)")
    meta = _sampling_meta(args.samples)
    from usp_scale.eval import resolve_protocol
    metrics = args.metrics
    if metrics is None and resolve_protocol(args.protocol, args.feature_extractor, args.reference) != "adm":
        metrics = ["fid", "is"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = compute_metrics(args.samples, args.reference, metrics, args.feature_extractor, weights,
                                  device, args.batch_size, args.cache_dir, kid_subset_size=args.kid_subset_size,
                                  pr_k=args.pr_k, is_splits=args.is_splits, progress=progress,
                                  protocol=args.protocol, is_split_size=args.is_split_size)
    for w in results.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    for w in caught:
        if str(w.message) not in results.get("warnings", []):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    context = {
        "protocol": results["protocol"],
        "sampler": args.sampler or meta.get("sampler", "unknown"),
        "steps": args.steps or meta.get("steps", "unknown"),
        "cfg_scale": args.cfg_scale if args.cfg_scale is not None else meta.get("cfg_scale", "unknown"),
        "sampling_precision": args.sampling_precision or meta.get("sampling_precision", "unknown"),
        "reference": args.reference,
        "feature_extractor": args.feature_extractor,
        "samples": os.path.abspath(args.samples),
    }
    if weights:
        context["inception_weights"] = os.path.abspath(weights)
    records = make_records(results, context)
    out = args.out or os.path.join(args.samples if os.path.isdir(args.samples)
                                   else os.path.dirname(os.path.abspath(args.samples)), "metrics.jsonl")
    write_records(out, records)
    print(f"protocol: {results['protocol']} ({results['num_samples']} samples, {args.feature_extractor})")
    if results["protocol"] == "adm":
        print(format_adm(results))
    else:
        for r in records:
            print(format_record(r))
    print(f"results appended to {out}")
    return records


def cli(argv: Optional[list] = None) -> int:
    """:func:`main` with bad input as one line on stderr and exit code 2 (argparse's for a bad command line)."""
    from usp_scale.checkpoint.safe_load import CheckpointFileError
    try:
        main(argv)
    except (ValueError, KeyError, FileNotFoundError, IsADirectoryError, PermissionError, CheckpointFileError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_INPUT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
