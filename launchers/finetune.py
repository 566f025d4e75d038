#!/usr/bin/env python
"""Finetuning: --task dit | sit | cls | linprobe. Runs under python, torchrun, deepspeed --hostfile and SLURM.

    python launchers/finetune.py --task dit --config CONFIG checkpoint.init_from=runs/mae/export/model.safetensors
    torchrun --nproc_per_node 8 launchers/finetune.py --task sit --config CONFIG engine.name=ddp
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

from usp_scale.training.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(finetune=True, prog="launchers/finetune.py")
