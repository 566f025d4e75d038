#!/usr/bin/env python
"""Train the feature extractor shipped as ``usp-synthetic`` (usp_scale/assets/extractor/synthetic-cnn/) or, with
``--kind shapes``, as ``usp-shapes`` (usp_scale/assets/extractor/shapes-cnn/).

A small CNN classifier (usp_scale.eval.features.SyntheticCNN) trained on the train split of the bundled
synthetic dataset with flips, shifts and pixel noise, in a few minutes on a CPU. Its 64-d pooled features and
its logits stand in for Inception's in FID / IS / KID / precision-recall of the small runs: the numbers hold for
this dataset only. Writes model.safetensors, config.json, asset.json (command, seed, sha256, val accuracy,
the val-vs-train FID floor) and README.md.

    python launchers/train_extractor.py                           # re-makes the shipped asset
    python launchers/train_extractor.py --kind shapes ...         # shapes-cnn (usp-shapes): command in asset.json
    python launchers/train_extractor.py --out /tmp/ext --epochs 1   # a quick try (evaluate.py
                                                                  #   --feature-extractor usp-synthetic
                                                                  #   reads the shipped one only)
"""
import argparse
import json
import math
import os
import platform
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --kind -> (asset folder, the name torch-fidelity knows it by)
NAMES = {"styles": ("synthetic-cnn", "usp-synthetic"), "shapes": ("shapes-cnn", "usp-shapes")}


def build_parser():
    from usp_scale.data.synthetic import add_dataset_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="output folder (default: the shipped asset of --kind, "
                   "usp_scale/assets/extractor/synthetic-cnn for styles, .../shapes-cnn for shapes)")
    add_dataset_args(p)
    p.add_argument("--width", type=int, default=32, help="channels of the first conv (default 32)")
    p.add_argument("--dim", type=int, default=64, help="pooled feature size (default 64)")
    p.add_argument("--extra", type=int, default=0, help="stride-2 conv layers after the 8x8 map, before the pooling "
                   "(default 0; 2 lets a unit see the whole 64 px image, which the shapes task needs)")
    p.add_argument("--epochs", type=int, default=6, help="epochs over the train split (default 6)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate, cosine to 0 (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batches and augmentation")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def augment(x, g):
    """Random horizontal flips, shifts of up to 1/8 of the side (reflect padding) and pixel noise; x in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = h // 8
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    x = torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return x + torch.randn(x.shape, generator=g) * 0.05 * torch.rand(n, 1, 1, 1, generator=g)


def main(argv=None):
    a = build_parser().parse_args(argv)
    a.out = a.out or os.path.join(REPO, "usp_scale", "assets", "extractor", NAMES[a.kind][0])
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from tqdm import tqdm

    from usp_scale.assets import write_meta
    from usp_scale.fileio import write_json, write_text
    from usp_scale.data.synthetic import load_split, prepare_dataset
    from usp_scale.eval.features import SyntheticCNN
    from usp_scale.eval.metrics import frechet_distance, inception_score, statistics

    if a.threads:
        torch.set_num_threads(a.threads)
    data, tmp, data_info = prepare_dataset(a, "train_extractor_", progress=not a.no_progress)
    xtr, ytr = load_split(data, "train")
    xva, yva = load_split(data, "val")
    xtr = torch.from_numpy(xtr).permute(0, 3, 1, 2).float() / 127.5 - 1
    xva = torch.from_numpy(xva).permute(0, 3, 1, 2).float() / 127.5 - 1
    ytr, yva = torch.from_numpy(ytr), torch.from_numpy(yva)
    classes = int(ytr.max()) + 1

    torch.manual_seed(a.seed)
    cfg = {"num_classes": classes, "width": a.width, "dim": a.dim}
    if a.extra:
        cfg["extra"] = a.extra
    net = SyntheticCNN(**cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(a.seed)
    per_epoch = len(xtr) // a.batch_size
    total = per_epoch * a.epochs
    t0 = time.time()
    bar = tqdm(total=total, desc="train_extractor", disable=a.no_progress, dynamic_ncols=True)
    step, last = 0, {}
    for _ in range(a.epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=g)
        for b in range(per_epoch):
            idx = perm[b * a.batch_size:(b + 1) * a.batch_size]
            for grp in opt.param_groups:
                grp["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            logits = net(augment(xtr[idx], g))["logits"]
            loss = F.cross_entropy(logits, ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            last = {"loss": loss.item(), "train_top1": (logits.argmax(1) == ytr[idx]).float().mean().item() * 100}
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}")
    bar.close()
    train_s = time.time() - t0
    net.eval()
    with torch.no_grad():
        def run(x):
            outs = [net(x[i:i + 200]) for i in range(0, len(x), 200)]
            return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

        ftr, fva = run(xtr), run(xva)
    val_top1 = float((fva["logits"].argmax(1) == yva).float().mean()) * 100
    # What FID / IS read on real images of this dataset (the floor of the FID a generator can reach; IS near
    # the number of classes) at the main job's and the benchmark's sizes.
    gen = torch.Generator().manual_seed(0)
    floors = {}
    for n in (80, 400):
        n = min(n, len(fva["pool"]), len(ftr["pool"]))
        itr = torch.randperm(len(ftr["pool"]), generator=gen)[:n]
        ivl = torch.randperm(len(fva["pool"]), generator=gen)[:n]
        floors[str(n)] = {"fid_train_vs_val": frechet_distance(statistics(ftr["pool"][itr]),
                                                                statistics(fva["pool"][ivl])),
                          "is_val": inception_score(fva["logits"][ivl])["is_mean"]}
    os.makedirs(a.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(a.out, "model.safetensors"))
    write_json(os.path.join(a.out, "config.json"), cfg)
    cmd = "python launchers/train_extractor.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None
                                                                                     else sys.argv[1:]))
    meta = {
        "name": os.path.basename(os.path.normpath(a.out)), "kind": "extractor", "registered_as": NAMES[a.kind][1],
        "command": cmd.strip(), "seed": a.seed,
        "args": {k: v for k, v in vars(a).items() if k not in ("out", "data", "no_progress")}, "data": data_info,
        "params": sum(p.numel() for p in net.parameters()), "val_top1": val_top1, "val_images": len(xva),
        "reference_values": floors, "final_train": last, "train_seconds": round(train_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    meta = write_meta(a.out, meta, ["model.safetensors"])
    write_text(os.path.join(a.out, "README.md"), readme(meta))
    print(json.dumps({k: meta[k] for k in ("name", "val_top1", "reference_values", "train_seconds")}))
    if tmp is not None:
        tmp.cleanup()
    return meta


def readme(m: dict) -> str:
    d, r = m["data"], m["reference_values"]
    rows = "\n".join(f"| {n} vs {n} | {v['fid_train_vs_val']:.3f} | {v['is_val']:.2f} |" for n, v in r.items())
    name = m["registered_as"]
    return f"""# {m['name']}: the feature extractor of the small runs (`{name}`)

A small CNN classifier ({m['params'] / 1e3:.0f} k parameters) trained by `launchers/train_extractor.py` on the train
split of the generated `{d.get('kind', 'styles')}` dataset ({d['classes']} classes x {d['per_class']} images,
{d['size']} px, dataset seed {d['seed']}). torch-fidelity uses it as `--feature-extractor {name}`
(eval.feature_extractor): FID,
KID and precision/recall on its 64-d pooled features, IS on its logits. **These numbers hold for this synthetic
dataset only**; real data uses Inception (`inception-v3-compat`).

Val top-1: **{m['val_top1']:.2f} %** ({m['val_images']} images). Reference values (real images only, a random
draw): FID train split vs val split, and IS of val images (at most {d['classes']}, the number of classes):

| images | FID train vs val | IS val |
|---|---|---|
{rows}

Trained {m['args']['epochs']} epochs, batch {m['args']['batch_size']}, {m['train_seconds']:.0f} s on {m['machine']};
seed {m['seed']}; sha256 of model.safetensors `{m['sha256']['model.safetensors']}`. Made with (from the
repository root, {m['date']}, torch {m['versions']['torch']}):

    {m['command']}

The loader checks the sha256 (recorded in asset.json) on every load; retraining rewrites both.
"""


if __name__ == "__main__":
    main()
