"""The key accounting every transfer shares (MAE -> DiT/SiT/ViT in transfer/core.py, LightningMAE -> LightningDiT in
transfer/lightning.py): the error, the report of copied/fresh/dropped keys, the checks of a source and the patch
embedding's rule."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from ..checkpoint.diff import diff_shapes
from .formats import StateDict

_MAE_ONLY = re.compile(r"^(mask_token|decoder_.*)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


class TransferError(ValueError):
    """The checkpoint does not fit the target model."""


@dataclass
class TransferReport:
    source: str
    target: str
    copied: List[str] = field(default_factory=list)
    resampled: Dict[str, str] = field(default_factory=dict)
    dropped: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    # parts no checkpoint provides, by design (REPA's projector): name -> how they start; their keys are in ``new``
    fresh: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"transfer {self.source} -> {self.target}",
                 f"  copied    {len(self.copied):4d} tensors",
                 *[f"  resampled {k}: {v}" for k, v in self.resampled.items()],
                 f"  dropped   {len(self.dropped):4d}: {_compress(self.dropped)}",
                 f"  new       {len(self.new):4d}: {_compress(self.new)}",
                 *[f"  initialised fresh {k}: {v}" for k, v in self.fresh.items()],
                 *[f"  note: {n}" for n in self.notes]]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1)


def _compress(keys: List[str]) -> str:
    """blocks.0.x, blocks.1.x, ... -> blocks.*.x (for reports)."""
    seen: List[str] = []
    for k in keys:
        k = _BLOCK.sub(lambda m: f"blocks.*.{m.group(2)}", k)
        k = re.sub(r"^decoder_blocks\.\d+\.", "decoder_blocks.*.", k)
        if k not in seen:
            seen.append(k)
    return ", ".join(seen)


def _check_source(sd: StateDict, path: str) -> None:
    needed = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight")
    lacking = [k for k in needed if k not in sd]
    if lacking:
        raise TransferError(f"{path} is not a masked-autoencoder / ViT checkpoint: it lacks {', '.join(lacking)} "
                            f"(first keys: {', '.join(sorted(sd)[:8])})")


def _depth(sd: StateDict) -> int:
    ids = {int(m.group(1)) for k in sd for m in [_BLOCK.match(k)] if m}
    return max(ids) + 1 if ids else 0


def _shape_errors(own: StateDict, mapped: StateDict) -> List[str]:
    both = [k for k in mapped if k in own]
    return diff_shapes({k: mapped[k] for k in both}, {k: own[k] for k in both}, limit=len(both))


def copy_mapped(own: StateDict, mapped: StateDict, expected_new: set, source: str, target: str) -> set:
    """The one check-and-copy of every MAE -> diffusion-transformer transfer: the mapped tensors' shapes must be the
    target's, and the target keys left without a source must be exactly ``expected_new`` (else a
    :class:`TransferError` naming both differences); then the mapped tensors are copied into ``own`` (the target's
    live state dict, cast to its dtypes). Returns the keys left new (initialised by the caller)."""
    errors = _shape_errors(own, mapped)
    if errors:
        raise TransferError(f"{source} does not fit {target} (width or patch size differ):\n  "
                            + "\n  ".join(errors[:10]))
    missing = set(own) - set(mapped)
    if missing != expected_new:
        extra, lacking = sorted(missing - expected_new), sorted(expected_new - missing)
        raise TransferError(f"{source}: key sets differ from the expected transfer: not provided {extra[:10]}, "
                            f"provided but expected new {lacking[:10]}")
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v.to(own[k].dtype))
    return missing


def _patch_embed(sd: StateDict, own_w: torch.Tensor, prefix: str, skip_on_mismatch: bool,
                 report: TransferReport, mapped: StateDict) -> None:
    src_w = sd["patch_embed.proj.weight"]
    if tuple(src_w.shape[1:]) == tuple(own_w.shape[1:]) and src_w.shape[0] != own_w.shape[0]:
        raise TransferError(f"width differs: checkpoint patch_embed.proj.weight {tuple(src_w.shape)} vs model "
                            f"{prefix}.proj.weight {tuple(own_w.shape)}; pick the model size that matches the "
                            f"pretrained encoder (B: 768, L: 1024, XL: 1152)")
    if tuple(src_w.shape) == tuple(own_w.shape):
        mapped[f"{prefix}.proj.weight"] = src_w
        if "patch_embed.proj.bias" in sd:
            mapped[f"{prefix}.proj.bias"] = sd["patch_embed.proj.bias"]
        return
    msg = (f"patch_embed.proj.weight has shape {tuple(src_w.shape)} but the target's {prefix}.proj.weight is "
           f"{tuple(own_w.shape)} (in-channels / patch size differ: wrong VAE, or a pixel-space MAE?)")
    if not skip_on_mismatch:
        raise TransferError(msg + "; pass skip_patch_embed=True (--skip-patch-embed) to leave it at its init")
    report.notes.append("skipped on request: " + msg)
    report.dropped += [k for k in ("patch_embed.proj.weight", "patch_embed.proj.bias") if k in sd]
