"""The contract every registered model keeps (MAE, DiT, SiT, ViT classifier), checked over the whole registry by
tests/test_model_contract.py. The optimizer, the engine and the tasks use only these methods:

- ``no_weight_decay()``: parameter names kept out of weight decay on top of the rule for every model (tensors
  with ndim <= 1 and names ending in ``.bias``), read by :func:`usp_scale.training.optim.model_param_groups`.
- ``group_matcher(coarse)`` (timm's form) and ``layer_id(name)``: one layer-id rule for layer-wise lr decay,
  the one of MAE's finetuning code: the parameters matched by :attr:`stem` are layer 0, ``blocks.i.*`` is layer
  i + 1, everything else (final norm, head, decoder) is layer ``num_layers = depth + 1``.
- ``set_grad_checkpointing(enable)``: every transformer block (encoder and decoder) recomputes its forward in
  backward; the block's own hooks (FSDP2, DeepSpeed ZeRO-3) stay outside the recomputed region.
- ``set_kernels(mode)``: "auto", "triton" or "torch" for every fused op of the model (config ``model.kernels``).
- ``set_attn_backend(spec)``: the attention kernel of every attention module (the spec
  :func:`usp_scale.runtime.init_runtime` resolved from ``model.attn_backend``; ``create_model(...,
  attn_backend=spec)`` calls it). Both choices are model attributes set when the model is built; no forward reads a
  process-wide setting.
- ``flops_per_sample()``: forward matmul FLOPs of one sample (2 per multiply-add, attention scores included); the
  MAE's takes the mask ratio (its encoder sees the kept tokens). What a training step costs (the backward, a frozen
  encoder, recomputation) is the task's to count (:meth:`usp_scale.training.tasks.Task.train_flops_per_sample`).

The REPA models (``*-REPA``, usp_scale/models/repa.py) keep the same contract; their ``forward`` returns
``(output, zs)`` (zs: the projected tokens, one (N, T, z_dim) tensor per teacher), their projectors are outside
the blocks (layer ``num_layers``, the root of an FSDP/ZeRO-3 wrap) and ``flops_per_sample`` includes them.
"""
from __future__ import annotations

import re
from typing import Dict, List, Set, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..layers.attention import set_attention_backend
from ..kernels.dispatch import IMPLS

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class CheckpointBlock(nn.Module):
    """A transformer block whose ``block_forward`` is recomputed in backward when ``grad_checkpointing`` is on."""

    grad_checkpointing = False

    def block_forward(self, *args: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.block_forward, *args, use_reentrant=False)
        return self.block_forward(*args)


class LatentTransformer(nn.Module):
    """Base of every registered model. Subclasses set :attr:`stem` (names or name prefixes of layer 0) and
    hold their blocks in ``self.blocks`` (an ``nn.ModuleList``)."""

    stem: Tuple[str, ...] = ()
    blocks: nn.ModuleList
    kernels: str = "auto"

    def no_weight_decay(self) -> Set[str]:
        return set()

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_layers(self) -> int:
        """depth + 1: the layer id of everything after the blocks."""
        return self.depth + 1

    def _in_stem(self, name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in self.stem)

    def layer_id(self, name: str) -> int:
        """Layer of parameter ``name`` for layer-wise lr decay: stem 0, ``blocks.i`` i + 1, the rest depth + 1."""
        if self._in_stem(name):
            return 0
        m = _BLOCK.match(name)
        return int(m.group(1)) + 1 if m else self.num_layers

    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """timm's parameter-group patterns for the same rule as :meth:`layer_id` (what neither matches forms the
        last group, so timm's ``param_groups_layer_decay`` over them gives the official MAE lr scales)."""
        stem = "^(?:" + "|".join(re.escape(s) for s in self.stem) + r")(?:\.|$)"
        return dict(stem=stem, blocks=r"^blocks\.(\d+)\." if coarse else [(r"^blocks\.(\d+)\.", None)])

    def set_grad_checkpointing(self, enable: bool = True) -> int:
        """Activation checkpointing of every transformer block; returns the number of blocks."""
        blocks = [m for m in self.modules() if isinstance(m, CheckpointBlock)]
        for b in blocks:
            b.grad_checkpointing = bool(enable)
        return len(blocks)

    def set_kernels(self, kernels: str) -> None:
        """"auto", "triton" or "torch" for every fused op (resolved per op and device at each call)."""
        if kernels not in IMPLS:
            raise ValueError(f"model.kernels must be one of {IMPLS}, got {kernels!r}")
        for m in self.modules():
            if isinstance(m, LatentTransformer) or hasattr(m, "kernels"):
                m.kernels = kernels

    def set_attn_backend(self, spec: str) -> int:
        """Attention spec ``spec`` (:func:`usp_scale.layers.attention.attention_kernel`) for every attention module;
        returns their number."""
        return set_attention_backend(self, spec)

    def flops_per_sample(self) -> float:
        raise NotImplementedError
