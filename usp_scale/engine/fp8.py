"""FP8 matrix products for the transformer blocks' linear layers (torchao float8 training), opt-in.

``engine.fp8`` = ``tensorwise`` / ``rowwise`` / ``rowwise_with_gw_hp`` swaps the attention and MLP linears
of every block (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) for torchao's ``Float8Linear``: inputs,
weights and output gradients are scaled and cast to float8 (e4m3 forward, e5m2 gradients) for the matmul,
with fp32 master weights and the same parameter names, so checkpoints stay interchangeable with bf16 runs.
Everything else (patch embed, adaLN modulation whose batch dimension is only N rows, embedders, heads) keeps
its precision. This changes the numerics (it is never chosen automatically); it pays off on Hopper with
``engine.compile=true``, which fuses the scaling. Needs torchao; on CUDA a GPU with FP8 tensor cores
(compute capability >= 8.9). On the CPU it runs (slowly) for tests.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

# Linear layers inside a block that are converted (the big matrix products).
TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _in_block(fqn: str) -> bool:
    parts = fqn.split(".")
    return len(parts) >= 3 and parts[0] in ("blocks", "decoder_blocks") and parts[1].isdigit()


def fp8_targets(model: nn.Module) -> List[str]:
    """Names of the linear layers :func:`apply_fp8` converts: block attention/MLP linears whose dimensions are
    multiples of 16 (FP8 GEMM alignment)."""
    out = []
    for name, mod in model.named_modules():
        if (type(mod) is nn.Linear and _in_block(name) and name.split(".", 2)[2] in TARGETS
                and mod.in_features % 16 == 0 and mod.out_features % 16 == 0):
            out.append(name)
    return out


def apply_fp8(model: nn.Module, recipe: str, device: torch.device) -> List[str]:
    """Convert :func:`fp8_targets` in place to torchao ``Float8Linear`` with ``recipe`` (a value of the config's
    ``engine.fp8``); returns their names."""
    if recipe == "off":
        return []
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise RuntimeError(f"engine.fp8={recipe} needs torchao (pip install 'torchao>=0.12'); "
                           "or set engine.fp8=off") from e
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise RuntimeError(f"engine.fp8={recipe}: {torch.cuda.get_device_name(device)} (compute capability "
                               f"{cap[0]}.{cap[1]}) has no FP8 tensor cores (needs >= 8.9: Ada, Hopper or newer); "
                               "set engine.fp8=off")
    targets = set(fp8_targets(model))
    if not targets:
        raise ValueError(f"engine.fp8={recipe}: {type(model).__name__} has no block linear layers with dimensions "
                         "divisible by 16 to convert; set engine.fp8=off")
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: fqn in targets,
                               config=Float8LinearConfig.from_recipe_name(recipe))
    return sorted(targets)
