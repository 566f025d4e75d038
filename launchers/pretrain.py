#!/usr/bin/env python
"""Masked latent pretraining. Runs under python, torchrun, deepspeed --hostfile and SLURM.

    python launchers/pretrain.py --config configs/debug/synthetic_pretrain.yaml
    torchrun --nproc_per_node 8 launchers/pretrain.py --config CONFIG engine.name=fsdp2
    deepspeed --hostfile hostfile launchers/pretrain.py --config CONFIG engine.name=deepspeed
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

from usp_scale.training.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(finetune=False, prog="launchers/pretrain.py")
