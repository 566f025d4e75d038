#!/usr/bin/env python
"""Masked latent pretraining. Runs under python, torchrun, deepspeed --hostfile and SLURM.

    python launchers/pretrain.py --config configs/debug/synthetic_pretrain.yaml
    torchrun --nproc_per_node 8 launchers/pretrain.py --config CONFIG engine.name=fsdp2
    deepspeed --hostfile hostfile launchers/pretrain.py --config CONFIG engine.name=deepspeed
"""
import os
import sys

try:  # installed with `pip install -e .` (which also maps kernels/ to usp_scale.kernels)
    import usp_scale  # noqa: F401
except ImportError:  # a plain checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from usp_scale.training.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(finetune=False, prog="launchers/pretrain.py")
