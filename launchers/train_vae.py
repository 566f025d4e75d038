#!/usr/bin/env python
"""Train the small AutoencoderKL shipped as ``vae.path=synthetic-f8`` (usp_scale/assets/vae/synthetic-f8/).

A diffusers AutoencoderKL with the SD-VAE layout at a small width (x8 downsampling, 4 latent channels),
trained on the train split of the bundled synthetic dataset (launchers/make_synthetic.py) with an L1 + L2
reconstruction loss and a small KL term, in minutes on a CPU: the network is fully convolutional, so most steps
train on random 32 px crops (a quarter of the cost) and the last ``--full-steps`` on whole images. Afterwards it

* computes the latent scale factor as SD did: 1 / std of posterior samples over the train split, and stores
  it as ``scaling_factor`` in config.json (every usp_scale path uses it for this VAE when vae.scale is 0);
* measures the reconstruction PSNR (posterior mean, uint8 images) on the val split;
* writes the diffusers folder (safetensors) plus asset.json (command, seed, sha256, PSNR, scale, versions)
  and a README.md.

    python launchers/train_vae.py                          # re-makes the shipped asset (about 10 min, 2 cores)
    python launchers/train_vae.py --kind shapes ...        # shapes-f8: the full command is in its asset.json
    python launchers/train_vae.py --out /tmp/vae --steps 100   # a quick try; then vae.path=/tmp/vae
    python launchers/train_vae.py --out usp_scale/assets/vae/synthetic-f16 --blocks 16,32,32,64,64 \
        --latent-channels 32 --layout vavae --full-steps 600   # the x16, 32-channel asset (VA-VAE's layout)
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
NAMES = {"styles": "synthetic-f8", "shapes": "shapes-f8"}   # the shipped asset of each --kind


def build_parser():
    from usp_scale.data.synthetic import add_dataset_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="output folder (default: the shipped asset of --kind, "
                   "usp_scale/assets/vae/synthetic-f8 for styles, usp_scale/assets/vae/shapes-f8 for shapes)")
    add_dataset_args(p)
    p.add_argument("--blocks", default="16,32,64,64", help="block_out_channels; the number of blocks B gives "
                   "x2^(B-1) downsampling (default 16,32,64,64: x8)")
    p.add_argument("--layers", type=int, default=1, help="layers_per_block (default 1)")
    p.add_argument("--layout", choices=("sd", "vavae"), default="sd",
                   help="block types: sd = SD-VAE's (no attention in the down/up blocks; the default), vavae = "
                        "VA-VAE's (LDM attention at the lowest resolution: after every res-block of the last down "
                        "block and of the first up block, AttnDown/AttnUpDecoder blocks)")
    p.add_argument("--groups", type=int, default=16, help="GroupNorm groups (default 16)")
    p.add_argument("--latent-channels", type=int, default=4, help="latent channels (default 4, as SD-VAE)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--crop", type=int, default=32, help="train on random crops of this side (a multiple of the "
                   "downsampling; 0 = whole images) until the last --full-steps (default 32)")
    p.add_argument("--full-steps", type=int, default=300, help="last steps on whole images (default 300)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3, cosine to 0)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    p.add_argument("--kl-weight", type=float, default=1e-6,
                   help="KL weight against the per-image summed reconstruction loss, as LDM's (default 1e-6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batches and flips")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def psnr_uint8(a, b) -> "torch.Tensor":
    """Per-image PSNR (dB) of uint8-valued tensors (N, 3, H, W)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * (255.0 ** 2 / mse).log10()


def to_uint8(x):
    """[-1, 1] float -> uint8-valued (rounded) float tensor."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


def main(argv=None):
    a = build_parser().parse_args(argv)
    a.out = a.out or os.path.join(REPO, "usp_scale", "assets", "vae", NAMES[a.kind])
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    from usp_scale.assets import write_meta
    from usp_scale.data.synthetic import load_split, prepare_dataset

    if a.threads:
        torch.set_num_threads(a.threads)
    data, tmp, data_info = prepare_dataset(a, "train_vae_", progress=not a.no_progress)
    xtr, _ = load_split(data, "train")
    xva, _ = load_split(data, "val")
    xtr = torch.from_numpy(xtr).permute(0, 3, 1, 2).contiguous()     # (N, 3, H, W) uint8
    xva = torch.from_numpy(xva).permute(0, 3, 1, 2).contiguous()

    blocks = tuple(int(b) for b in a.blocks.split(","))
    torch.manual_seed(a.seed)
    down, up = ["DownEncoderBlock2D"] * len(blocks), ["UpDecoderBlock2D"] * len(blocks)
    if a.layout == "vavae":
        down[-1], up[0] = "AttnDownEncoderBlock2D", "AttnUpDecoderBlock2D"
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=tuple(down),
                          up_block_types=tuple(up), block_out_channels=blocks,
                          layers_per_block=a.layers, latent_channels=a.latent_channels, norm_num_groups=a.groups)
    nparams = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    bar = tqdm(range(a.steps), desc="train_vae", disable=a.no_progress, dynamic_ncols=True)
    perm, pos, last = torch.randperm(len(xtr), generator=g), 0, {}
    model.train()
    for step in bar:
        lr = a.lr * min(1.0, (step + 1) / max(a.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        if pos + a.batch_size > len(perm):
            perm, pos = torch.randperm(len(xtr), generator=g), 0
        idx = perm[pos:pos + a.batch_size]
        pos += a.batch_size
        x = xtr[idx].float() / 127.5 - 1
        if a.crop and step < a.steps - a.full_steps:
            oy, ox = torch.randint(0, a.size - a.crop + 1, (2, len(x)), generator=g)
            x = torch.stack([x[i, :, oy[i]:oy[i] + a.crop, ox[i]:ox[i] + a.crop] for i in range(len(x))])
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        post = model.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = model.decode(z).sample
        err = rec - x
        rec_loss = err.abs().mean() + err.pow(2).mean()
        kl = post.kl().mean() / x[0].numel()                           # per pixel, like rec_loss
        loss = rec_loss + a.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == a.steps - 1:
            last = {"loss": loss.item(), "rec": rec_loss.item(),
                    "kl_per_latent": post.kl().mean().item() / post.mean[0].numel()}
            bar.set_postfix(rec=f"{last['rec']:.4f}", kl=f"{last['kl_per_latent']:.1f}")
    bar.close()
    train_s = time.time() - t0
    model.eval()

    with torch.no_grad():
        def moments(x):
            out = [model.encode(x[i:i + 100].float() / 127.5 - 1).latent_dist for i in range(0, len(x), 100)]
            return torch.cat([o.mean for o in out]), torch.cat([o.std for o in out])

        mean, std = moments(xtr)
        gs = torch.Generator().manual_seed(a.seed + 1)
        z = mean + std * torch.randn(mean.shape, generator=gs)
        scale = float(1.0 / z.flatten().std())
        vmean, _ = moments(xva)
        rec = torch.cat([model.decode(vmean[i:i + 100]).sample for i in range(0, len(vmean), 100)])
        psnr = psnr_uint8(to_uint8(rec), xva.float())
    model.register_to_config(scaling_factor=scale)
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True)
    cmd = "python launchers/train_vae.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None
                                                                               else sys.argv[1:]))
    meta = {
        "name": os.path.basename(os.path.normpath(a.out)), "kind": "vae", "command": cmd.strip(), "seed": a.seed,
        "args": {k: v for k, v in vars(a).items() if k not in ("out", "data", "no_progress")},
        "data": data_info, "params": nparams, "downsample": 2 ** (len(blocks) - 1),
        "latent_channels": a.latent_channels, "scaling_factor": scale,
        "latent_mean": float(z.mean()), "latent_std_unscaled": float(z.flatten().std()),
        "posterior_std_mean": float(std.mean()),
        "val_psnr_db": float(psnr.mean()), "val_psnr_db_min": float(psnr.min()), "val_images": len(xva),
        "final_train": last, "train_seconds": round(train_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    meta = write_meta(a.out, meta, ["diffusion_pytorch_model.safetensors"])
    from usp_scale.fileio import write_text
    write_text(os.path.join(a.out, "README.md"), readme(meta))
    print(json.dumps({k: meta[k] for k in ("name", "scaling_factor", "val_psnr_db", "train_seconds", "params")}))
    if tmp is not None:
        tmp.cleanup()
    return meta


def readme(m: dict) -> str:
    d, g = m["data"], m["args"]
    rows = [("reconstruction PSNR, val split ({} images, posterior mean)".format(m["val_images"]),
             f"{m['val_psnr_db']:.2f} dB (min {m['val_psnr_db_min']:.2f})"),
            ("latent scale factor (1 / std of posterior samples, train split)", f"{m['scaling_factor']:.5f}"),
            ("training", f"{g['steps']} steps x {g['batch_size']} images ({g['crop']} px crops, whole images in the "
                         f"last {g['full_steps']}), {m['train_seconds']:.0f} s on {m['machine']}")]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    layout = ("VA-VAE's block layout (attention at the lowest resolution)" if g.get("layout") == "vavae"
              else "SD-VAE's block layout")
    real = "the VA-VAE" if g.get("layout") == "vavae" else "the SD-VAE"
    return f"""# {m['name']}: a small AutoencoderKL for the synthetic dataset

A diffusers `AutoencoderKL` (x{m['downsample']} downsampling, {m['latent_channels']} latent channels,
{layout}, {m['params'] / 1e6:.2f} M parameters) trained by `launchers/train_vae.py` on the train split of the generated
`{d.get('kind', 'styles')}` dataset ({d['classes']} classes x {d['per_class']} images, {d['size']} px, dataset seed
{d['seed']}).
Use it with `vae.path={m['name']}` (or `--vae {m['name']}` / `--vae-path {m['name']}` in the launchers).
It is for the CPU demo and the small benchmarks only: real data uses {real}.

{table}
| seed | {m['seed']} |
| sha256 of diffusion_pytorch_model.safetensors | `{m['sha256']['diffusion_pytorch_model.safetensors']}` |

Made with (from the repository root, {m['date']}, torch {m['versions']['torch']}):

    {m['command']}

The loader checks the sha256 above (recorded in asset.json) on every load; retraining rewrites both.
"""


if __name__ == "__main__":
    main()
