#!/usr/bin/env python3
"""Transfer a pretrained latent MAE into a DiT/SiT or a ViT classifier and export the result.

Example:
  python launchers/transfer.py --src runs/pretrain/export/model.safetensors \
      --model DiT-XL/2-VAE-simple --input-size 32 --out runs/transfer/dit_xl.safetensors

Writes the transferred model as safetensors plus ``<out>.report.json`` (what was copied,
resampled, dropped and newly initialised) and prints the report.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="pretrained MAE checkpoint: official {'model': ...} .pth, a bare "
                                                "state dict, or this project's .safetensors export")
    p.add_argument("--model", required=True, help="target registry name, e.g. DiT-XL/2-VAE-simple, SiT-B/2-VAE-simple, "
                                                  "vit_large_patch16_vae")
    p.add_argument("--out", required=True, help="output .safetensors path of the transferred model")
    p.add_argument("--input-size", type=int, default=None,
                   help="latent side of the target (DiT/SiT: 32 for 256 px; classifier: 28 for 224 px)")
    p.add_argument("--in-chans", type=int, default=4, help="latent channels (4 for the d8 VAE, 16 for d16)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the target")
    p.add_argument("--global-pool", default="avg", choices=["avg", "token"],
                   help="classifier only: avg (finetune) or token (linear probe, adds the BatchNorm head)")
    p.add_argument("--use-pretrain-layer", type=int, default=-1,
                   help="DiT/SiT only: load blocks < k and leave the rest at init (-1 = all)")
    p.add_argument("--skip-patch-embed", action="store_true",
                   help="leave the patch embedding at its init when channel counts or patch sizes differ "
                        "(otherwise such a mismatch is an error)")
    p.add_argument("--which", default="model", choices=["model", "ema", "auto"],
                   help="which weights of a multi-weight checkpoint to read")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation of the layers the MAE does not "
                   "provide (embedders, adaLN, heads), so the same arguments write the same file (default 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from usp_scale.models import create_model, model_family
    from usp_scale.fileio import save_safetensors, write_text
    from usp_scale.transfer import transfer

    family = model_family(args.model)
    kwargs = {"num_classes": args.num_classes}
    if family in ("dit", "sit"):
        kwargs.update(in_channels=args.in_chans)
        if args.input_size:
            kwargs["input_size"] = args.input_size
    elif family == "vit":
        kwargs.update(in_chans=args.in_chans, global_pool=args.global_pool, linprobe=args.global_pool == "token")
        if args.input_size:
            kwargs["img_size"] = args.input_size
    else:
        raise SystemExit(f"--model {args.model} is a masked autoencoder; transfer targets are DiT/SiT or classifiers")
    import torch

    torch.manual_seed(args.seed)
    model = create_model(args.model, **kwargs)
    report = transfer(model, args.src, use_pretrain_layer=args.use_pretrain_layer,
                      skip_patch_embed=args.skip_patch_embed, which=args.which)
    print(report.summary())
    meta = {"source": os.path.abspath(args.src), "model": args.model, "kwargs": json.dumps(kwargs)}
    save_safetensors(model, args.out, metadata=meta)
    write_text(args.out + ".report.json", report.to_json())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a bad input file or argument: its message (naming the file), not a traceback
        from usp_scale.checkpoint.safe_load import CheckpointFileError
        from usp_scale.fileio import DiskFullError
        from usp_scale.transfer import TransferError
        errors = (CheckpointFileError, DiskFullError, FileNotFoundError, TransferError, KeyError, ValueError)
        if not isinstance(e, errors):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
