#!/usr/bin/env python
"""The same samples under both metric protocols (ADM's and torch-fidelity's): how far apart are the numbers?

    python benchmarks/eval/protocols.py --data runs/tiny/data --samples runs/tiny/samples/samples_80x64x64x3.npz \
        [--inception-graph G.pb] --out benchmarks/reports/eval_protocols_cpu_<date>.md

Sets, each against the synthetic dataset's val split (the main job's reference): the main job's samples
(``--samples``), as many real train images (the floor) and uniform noise. Extractor: ``usp-synthetic`` (the
shipped network of the small runs), so the two protocols differ only in their metric definitions (IS splits,
Fréchet square root, fp16 vs fp32 k-NN distances). With ``--inception-graph`` (e.g. a test graph from
``python -m usp_scale.eval.inception_graph write-test-graph``) the main-job samples are also scored with the
Inception network, where the protocols also differ in the network's implementation (ours vs torch-fidelity's).
ADM's IS of fewer than 5,000 samples is one chunk of all of them (what ADM computes then): ``--is-split-size N``.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

KEYS = (("IS (adm: one chunk of N)", "is_mean"), ("IS (adm: 10 ordered chunks of N/10)", "is_tenth"), ("FID", "fid"),
        ("sFID", "sfid"), ("precision", "precision"), ("recall", "recall"))


def _train_images(data: str, n: int):
    import numpy as np
    from PIL import Image
    files = sorted(glob.glob(os.path.join(data, "train", "**", "*.jpg"), recursive=True) +
                   glob.glob(os.path.join(data, "train", "**", "*.png"), recursive=True))
    idx = np.random.RandomState(0).permutation(len(files))[:n]
    return np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in sorted(idx)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the synthetic dataset (its val/ is the reference)")
    ap.add_argument("--samples", default=None, help="the main job's samples (.npz or folder)")
    ap.add_argument("--feature-extractor", default="usp-synthetic", help="extractor of the synthetic rows")
    ap.add_argument("--inception-graph", default=None, help="also score the samples with this Inception graph")
    ap.add_argument("--out", default=None, help="markdown report")
    a = ap.parse_args(argv)
    import numpy as np
    import torch

    from usp_scale.eval import compute_metrics
    from usp_scale.eval.metrics import source_count

    ref = os.path.join(a.data, "val")
    n_ref = source_count(ref)
    sets = {}
    if a.samples:
        sets["main-job samples"] = a.samples
    n = source_count(a.samples) if a.samples else n_ref
    sets["real train images (floor)"] = _train_images(a.data, n)
    side = int(sets["real train images (floor)"].shape[1])
    sets["uniform noise"] = np.random.RandomState(1).randint(0, 256, (n, side, side, 3)).astype(np.uint8)
    rows = []
    runs = [(name, src, a.feature_extractor, None) for name, src in sets.items()]
    if a.inception_graph and a.samples:
        runs.append(("main-job samples, Inception test graph", a.samples, "inception-v3-compat", a.inception_graph))
    for name, src, ext, weights in runs:
        res = {}
        for protocol in ("adm", "torch-fidelity"):
            kw = dict(is_split_size=n) if protocol == "adm" else dict(is_splits=10)
            res[protocol] = compute_metrics(src, ref, ["is", "fid", "sfid", "pr"], ext, weights, "cpu",
                                            protocol=protocol, progress=False, **kw)
        # the same split size as torch-fidelity's (N/10): what remains is ADM's order against the shuffle
        res["adm"]["is_tenth"] = compute_metrics(src, None, ["is"], ext, weights, "cpu", protocol="adm",
                                                 progress=False, is_split_size=n // 10)["is_mean"]
        res["torch-fidelity"]["is_tenth"] = res["torch-fidelity"]["is_mean"]
        rows.append((name, ext, res))
    lines = [f"# The same samples under the ADM and torch-fidelity protocols ({datetime.date.today().isoformat()})",
             "", f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, load average "
             f"{os.getloadavg()[0]:.1f}. Reference: {ref} ({n_ref} images); {n} images per set. "
             "ADM's IS: one ordered chunk of all samples (what ADM computes below 5,000), and 10 ordered chunks "
             "(torch-fidelity's split size); torch-fidelity's: 10 shuffled splits. Command: "
             "`python benchmarks/eval/protocols.py "
             + " ".join(sys.argv[1:] if argv is None else argv) + "`", "",
             "| set | extractor | metric | adm | torch-fidelity | adm - torch-fidelity |", "|---|---|---|---|---|---|"]
    for name, ext, res in rows:
        for label, k in KEYS:
            x, y = res["adm"][k], res["torch-fidelity"][k]
            if k in ("precision", "recall"):       # torch-fidelity returns a float32 fraction
                y = round(y * n) / n if abs(y * n - round(y * n)) < 1e-3 else y
            lines.append(f"| {name} | {ext} | {label} | {x:.6g} | {y:.6g} | {x - y:+.3g} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
