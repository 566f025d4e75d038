#!/usr/bin/env python
"""Train the REPA teacher shipped as ``synthetic-vit`` (usp_scale/assets/teacher/synthetic-vit/): REPA's alignment
on the CPU in miniature (``repa.teacher=synthetic-vit repa.teacher_path=synthetic-vit``).

The network is DINOv2's architecture at CPU size (usp_scale.models.teacher.TEACHERS["synthetic-vit"]: patch 14,
LayerScale, no registers, 64-wide, 3 blocks), so it goes through the same code as REPA's DINOv2 ViT-B/14: the same
strict loader (timm's key layout, ``model.safetensors``), the same input transform (raw pixels / 255, ImageNet
mean/std, bicubic resize; 64 px -> 56 px, REPA's 7/8, 4 x 4 = 16 patch tokens, SiT-tiny/2's count on synthetic-f8's
8 x 8 latents), the same target (final-norm patch tokens, no cls).

It is trained **supervised, on the labels** (DINOv2 is self-supervised; a labelled objective is what makes a
3-block ViT useful in a few CPU minutes): a linear head on **every patch token** and on their mean, cross-entropy,
so that each token the student is aligned with carries the class. The head is not shipped. Images: the train split of
the bundled synthetic dataset with the extractor's augmentation (flips, shifts, pixel noise). Writes
model.safetensors (the teacher only, timm's keys, its 4 x 4 position table), asset.json (command, seed, sha256, val
accuracy per token and pooled, a linear-probe-free check that the tokens carry the class) and README.md.

    python launchers/train_teacher.py                    # re-makes the shipped asset
    python launchers/train_teacher.py --out /tmp/t --epochs 1   # a quick try
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
NAME = "synthetic-vit"


def build_parser():
    from usp_scale.data.synthetic import add_dataset_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="output folder (default: the shipped asset, "
                   "usp_scale/assets/teacher/synthetic-vit)")
    add_dataset_args(p)
    p.add_argument("--epochs", type=int, default=30, help="epochs over the train split (default 30)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate, cosine to 0 (default 2e-3)")
    p.add_argument("--layerscale-init", type=float, default=0.1, help="initial LayerScale gamma (default 0.1; "
                   "DINOv2's 1e-5 is for 12+ block networks trained for days)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batches and augmentation")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    a.out = a.out or os.path.join(REPO, "usp_scale", "assets", "teacher", NAME)
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from tqdm import tqdm

    from launchers.train_extractor import augment
    from usp_scale.assets import write_meta
    from usp_scale.data.synthetic import load_split, prepare_dataset
    from usp_scale.fileio import write_text
    from usp_scale.models.teacher import (TEACHERS, DINOv2ViT, raw_from_unit_range, repa_preprocess,
                                          teacher_input_size)

    if a.threads:
        torch.set_num_threads(a.threads)
    data, tmp, data_info = prepare_dataset(a, "train_teacher_", progress=not a.no_progress)
    xtr, ytr = load_split(data, "train")
    xva, yva = load_split(data, "val")
    size = xtr.shape[1]
    xtr = torch.from_numpy(xtr).permute(0, 3, 1, 2).float() / 127.5 - 1
    xva = torch.from_numpy(xva).permute(0, 3, 1, 2).float() / 127.5 - 1
    ytr, yva = torch.from_numpy(ytr).long(), torch.from_numpy(yva).long()
    classes = int(ytr.max()) + 1

    spec = TEACHERS[NAME]
    input_size = teacher_input_size(NAME, size)          # 56 at 64 px
    grid = input_size // spec.patch_size
    torch.manual_seed(a.seed)
    net = DINOv2ViT(spec, grid=grid)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith(".gamma"):
                p.fill_(a.layerscale_init)
    head = nn.Linear(spec.embed_dim, classes)

    def tokens(x):   # exactly the teacher's input transform (FrozenTeacher.from_unit_range), with gradients
        return net(repa_preprocess(raw_from_unit_range(x), input_size))

    def loss_fn(tok, y):
        per_token = F.cross_entropy(head(tok).flatten(0, 1), y.repeat_interleave(tok.shape[1]), label_smoothing=0.1)
        pooled = F.cross_entropy(head(tok.mean(1)), y, label_smoothing=0.1)
        return per_token + pooled

    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(a.seed)
    per_epoch = len(xtr) // a.batch_size
    total = per_epoch * a.epochs
    t0 = time.time()
    bar = tqdm(total=total, desc="train_teacher", disable=a.no_progress, dynamic_ncols=True)
    step, last = 0, {}
    net.train()
    for _ in range(a.epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for b in range(per_epoch):
            idx = perm[b * a.batch_size:(b + 1) * a.batch_size]
            for grp in opt.param_groups:
                grp["lr"] = a.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = loss_fn(tokens(augment(xtr[idx], g).clamp(-1, 1)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            last = {"loss": loss.item()}
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}")
    bar.close()
    train_s = time.time() - t0
    net.eval()
    with torch.no_grad():
        tok = torch.cat([tokens(xva[i:i + 200]) for i in range(0, len(xva), 200)])      # (N, T, D)
        logits = head(tok)
        token_top1 = float((logits.argmax(-1) == yva[:, None]).float().mean()) * 100
        pooled_top1 = float((head(tok.mean(1)).argmax(-1) == yva).float().mean()) * 100
        # without the head: nearest class mean of the val tokens (leave-one-out free: class means from train)
        ttr = torch.cat([tokens(xtr[i:i + 200]) for i in range(0, len(xtr), 200)])
        means = torch.stack([F.normalize(ttr[ytr == c].mean((0, 1)), dim=0) for c in range(classes)])
        ncm = F.normalize(tok, dim=-1) @ means.T                                         # (N, T, C)
        ncm_top1 = float((ncm.argmax(-1) == yva[:, None]).float().mean()) * 100
    os.makedirs(a.out, exist_ok=True)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, os.path.join(a.out, "model.safetensors"))
    cmd = "python launchers/train_teacher.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    meta = {
        "name": os.path.basename(os.path.normpath(a.out)), "kind": "teacher", "registered_as": NAME,
        "teacher": NAME, "format": "timm keys, safetensors", "image_size": size, "input_size": input_size,
        "tokens": grid * grid, "dim": spec.embed_dim,
        "command": cmd.strip(), "seed": a.seed, "objective": "supervised: cross-entropy of a linear head on every "
        "patch token and on their mean (head not shipped)",
        "args": {k: v for k, v in vars(a).items() if k not in ("out", "data", "no_progress")}, "data": data_info,
        "params": sum(p.numel() for p in net.parameters()), "val_images": len(xva),
        "val_token_top1": token_top1, "val_pooled_top1": pooled_top1, "val_token_nearest_class_mean_top1": ncm_top1,
        "final_train": last, "train_seconds": round(train_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    meta = write_meta(a.out, meta, ["model.safetensors"])
    write_text(os.path.join(a.out, "README.md"), readme(meta, a.out))
    print(json.dumps({k: meta[k] for k in ("name", "val_token_top1", "val_pooled_top1",
                                          "val_token_nearest_class_mean_top1", "train_seconds")}))
    if tmp is not None:
        tmp.cleanup()
    return meta


def readme(m: dict, folder: str) -> str:
    d = m["data"]
    size_kb = os.path.getsize(os.path.join(folder, "model.safetensors")) / 1e3
    return f"""# {m['name']}: the REPA teacher of the small runs (`repa.teacher={m['teacher']}`)

A DINOv2-shaped ViT ({m['params'] / 1e3:.0f} k parameters, {m['dim']}-wide, patch 14, LayerScale, no registers;
usp_scale/models/teacher.py `TEACHERS["{m['teacher']}"]`) trained by `launchers/train_teacher.py` on the train split
of the generated `{d.get('kind', 'styles')}` dataset ({d['classes']} classes x {d['per_class']} images, {d['size']} px,
dataset seed {d['seed']}). It stands in for REPA's DINOv2 ViT-B/14 in the CPU-sized REPA runs
(`repa.teacher={m['teacher']} repa.teacher_path={m['registered_as']}`) and goes through the same code: the strict
loader (timm's keys), REPA's input transform (raw pixels / 255, ImageNet mean/std, bicubic resize {m['image_size']} ->
{m['input_size']} px, REPA's 7/8 ratio), the final-norm patch tokens without cls:
**{m['tokens']} tokens of {m['dim']}**, the count of SiT-tiny/2 on synthetic-f8's 8 x 8 latents.

**Trained supervised, on the labels** (REPA's teacher is self-supervised; here a labelled objective makes a 3-block
ViT useful in a few CPU minutes): {m['objective']}. So every patch token carries the class: on the
{m['val_images']} val images, per-token top-1 **{m['val_token_top1']:.2f} %** with the training head, pooled
{m['val_pooled_top1']:.2f} %, and per-token {m['val_token_nearest_class_mean_top1']:.2f} % without any head
(cosine to the nearest class mean of the train tokens). These numbers hold for this synthetic dataset only.

Trained {m['args']['epochs']} epochs, batch {m['args']['batch_size']}, {m['train_seconds']:.0f} s on {m['machine']};
seed {m['seed']}; model.safetensors ({size_kb:.0f} kB) sha256 `{m['sha256']['model.safetensors']}`. Made with (from the
repository root, {m['date']}, torch {m['versions']['torch']}):

    {m['command']}

The loader checks the sha256 (recorded in asset.json) on every load; retraining rewrites both.
"""


if __name__ == "__main__":
    main()
