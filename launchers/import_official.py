#!/usr/bin/env python3
"""Continue an official MAE/USP pretraining run with usp_scale: import its checkpoint-N.pth as a resumable run.

The official pretraining code saves {"model", "optimizer", "epoch", "scaler", "args"}. This writes them as the first
checkpoint of the run that --config (+ key=value overrides) describes: the weights (strictly), the AdamW moments
re-keyed from the official groups [no decay, decay] onto ours by parameter name, the fp16 loss scale, and the
position: the epoch after the official one, step = epoch x steps per epoch of this config (so the learning rate is
the official schedule's at that epoch). Then the usual launcher with the same recipe and output_dir resumes from it,
on any engine but DeepSpeed and any world size (keep data.global_batch_size).

Examples:
  # the official run stopped after 800 epochs (checkpoint-799.pth); continue it to 1,600 on 8 GPUs
  python launchers/import_official.py checkpoint-799.pth --config configs/pretrain/usp_base_224.yaml \\
      schedule.epochs=1600 output_dir=runs/usp_b_1600
  torchrun --nproc_per_node 8 launchers/pretrain.py --config configs/pretrain/usp_base_224.yaml \\
      schedule.epochs=1600 output_dir=runs/usp_b_1600

It runs in one process on the local engine and reads the dataset's index (the steps per epoch come from it); the
run's config must have the official run's model. What the official run set differently from the config is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

from usp_scale.checkpoint.official_mae import OfficialImportError  # noqa: E402
from usp_scale.checkpoint.safe_load import CheckpointFileError  # noqa: E402
from usp_scale.config import ConfigError  # noqa: E402
from usp_scale.training.import_official import import_official_mae  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launchers/import_official.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="the official pretraining checkpoint (checkpoint-N.pth: model, optimizer, epoch, "
                   "scaler, args)")
    p.add_argument("--config", required=True, help="the pretraining recipe the run continues under (e.g. "
                   "configs/pretrain/usp_base_224.yaml); trailing key=value arguments override it")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. schedule.epochs=1600 output_dir=runs/usp_b_1600")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        res = import_official_mae(args.config, args.overrides, args.checkpoint)
    except (OfficialImportError, ConfigError, CheckpointFileError, FileNotFoundError, ValueError) as e:
        print(f"[usp_scale] ERROR: {e}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({k: res[k] for k in ("checkpoint", "step", "epoch", "steps_per_epoch")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
