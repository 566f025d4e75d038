"""Pretrained latent MAE -> DiT / SiT / ViT classifier (docs/method.md §3).

The official code loads with ``strict=False``, which hides name errors. Here every target key
is accounted for: each one is either copied, resampled, or in the exact set of keys that are
expected to be new. Anything else is an error that names the keys and shapes that disagree.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..layers.pos_embed import resample_grid
from ..models.dit import DiT
from ..models.mae import MaskedAutoencoderViT
from ..models.vit import VisionTransformer
from ..models.lightningdit import LightningDiT
from .formats import StateDict, load_weights, read_state_dict
from .lightning import is_lightning_mae, mae_to_lightningdit
from .report import (_BLOCK, _MAE_ONLY, TransferError, TransferReport, _check_source, _depth, _patch_embed,
                     _shape_errors, copy_mapped)

def mae_to_dit(model: DiT, sd: StateDict, source: str = "<state dict>", use_pretrain_layer: int = -1,
               skip_patch_embed: bool = False) -> TransferReport:
    """Load an MAE encoder into a DiT/SiT in place and return the report."""
    _check_source(sd, source)
    report = TransferReport(source, type(model).__name__ + (" (VAE-simple)" if model.vae_simple else ""))
    own = model.state_dict()
    depth = len(model.blocks)
    src_depth = _depth(sd)
    keep = depth if use_pretrain_layer < 0 else use_pretrain_layer
    mapped: StateDict = {}
    _patch_embed(sd, own["x_embedder.proj.weight"], "x_embedder", skip_patch_embed, report, mapped)
    if use_pretrain_layer > depth:
        raise TransferError(f"use_pretrain_layer={use_pretrain_layer} exceeds the model depth {depth}")
    if src_depth < keep:
        raise TransferError(f"{source} has {src_depth} blocks but {keep} are to be loaded into a depth-{depth} model")

    # Position table: drop the cls row, resample bicubically when the grids differ; stays frozen.
    pos = sd["pos_embed"]
    grid = model.x_embedder.grid_size
    src_grid = int(round((pos.shape[1] - 1) ** 0.5))
    if (src_grid * src_grid + 1) != pos.shape[1]:
        raise TransferError(f"{source}: pos_embed {tuple(pos.shape)} is not (1, 1 + G*G, D) with a cls row")
    mapped["pos_embed"] = resample_grid(pos, grid, num_prefix=1)
    if src_grid != grid:
        report.resampled["pos_embed"] = f"{src_grid}x{src_grid} -> {grid}x{grid} bicubic (cls row dropped)"

    for k, v in sd.items():
        m = _BLOCK.match(k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if i >= keep:
                report.dropped.append(k)
            elif rest.startswith(("norm1.", "norm2.")) and not model.vae_simple:
                report.dropped.append(k)  # plain DiT blocks have non-affine LayerNorms (the dnln ablation)
            else:
                mapped[k] = v
        elif k in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"):
            continue
        elif k in ("cls_token", "norm.weight", "norm.bias") or _MAE_ONLY.match(k):
            report.dropped.append(k)
        else:
            raise TransferError(f"{source}: unexpected key {k!r} {tuple(v.shape)} in an MAE checkpoint")

    unknown = sorted(set(mapped) - set(own))
    if unknown:
        raise TransferError(f"{source}: keys with no place in {report.target}: {', '.join(unknown[:10])}")
    expected_new = {k for k in own if k.startswith(("t_embedder.", "y_embedder.", "final_layer."))
                    or ".adaLN_modulation." in k}
    expected_new |= {k for k in own if (m := _BLOCK.match(k)) and int(m.group(1)) >= keep}
    projectors = sorted(k for k in own if k.startswith("projectors."))   # REPA's projector (models/repa.py)
    expected_new |= set(projectors)
    if "x_embedder.proj.weight" not in mapped:
        expected_new |= {"x_embedder.proj.weight", "x_embedder.proj.bias"}
    missing = copy_mapped(own, mapped, expected_new, source, report.target)
    # New parts keep the official init: zeroed adaLN and final layer, N(0, 0.02) embedders.
    for k in sorted(missing):
        if ".adaLN_modulation." in k or k.startswith("final_layer."):
            own[k].zero_()
    model.pos_embed.requires_grad_(False)
    report.copied = sorted(k for k in mapped if k not in report.resampled)
    report.new = sorted(missing)
    if use_pretrain_layer >= 0:
        report.notes.append(f"use_pretrain_layer={use_pretrain_layer}: blocks >= {keep} keep their init")
    if projectors:
        report.fresh["projectors.*"] = (f"REPA projector after block {model.encoder_depth} ({len(projectors)} "
                                        "tensors): initialised fresh (xavier-uniform weights, zero biases)")
    return report


def mae_to_vit(model: VisionTransformer, sd: StateDict, source: str = "<state dict>",
               skip_patch_embed: bool = False) -> TransferReport:
    """Load an MAE encoder into the latent classifier (finetune: avg pool + fc_norm; probe: cls + norm)."""
    _check_source(sd, source)
    report = TransferReport(source, f"VisionTransformer (global_pool={model.global_pool})")
    own = model.state_dict()
    mapped: StateDict = {}
    _patch_embed(sd, own["patch_embed.proj.weight"], "patch_embed", skip_patch_embed, report, mapped)
    pos = sd["pos_embed"]
    grid = model.patch_embed.grid_size
    src_grid = int(round((pos.shape[1] - 1) ** 0.5))
    if src_grid != grid:
        mapped["pos_embed"] = torch.cat([pos[:, :1], resample_grid(pos, grid, num_prefix=1)], dim=1)
        report.resampled["pos_embed"] = f"{src_grid}x{src_grid} -> {grid}x{grid} bicubic (cls row kept)"
    else:
        mapped["pos_embed"] = pos
    src_depth = _depth(sd)
    if src_depth != model.depth:
        raise TransferError(f"{source} has {src_depth} blocks, the classifier has {model.depth}")
    has_norm = isinstance(model.norm, nn.LayerNorm)
    for k, v in sd.items():
        if _BLOCK.match(k) or k == "cls_token":
            mapped[k] = v
        elif k in ("norm.weight", "norm.bias"):
            if has_norm:
                mapped[k] = v
            else:
                report.dropped.append(k)  # avg pooling: timm replaces the final norm by Identity
        elif k in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"):
            continue
        elif _MAE_ONLY.match(k):
            report.dropped.append(k)
        else:
            raise TransferError(f"{source}: unexpected key {k!r} {tuple(v.shape)} in an MAE checkpoint")
    errors = _shape_errors(own, mapped)
    if errors:
        raise TransferError(f"{source} does not fit the classifier:\n  " + "\n  ".join(errors[:10]))
    expected_new = {k for k in own if k.startswith(("head.", "fc_norm."))}
    if "patch_embed.proj.weight" not in mapped:
        expected_new |= {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    missing = set(own) - set(mapped)
    if missing != expected_new:
        raise TransferError(f"{source}: key sets differ from the expected transfer: not provided "
                            f"{sorted(missing - expected_new)[:10]}, provided but expected new "
                            f"{sorted(expected_new - missing)[:10]}")
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v.to(own[k].dtype))
    report.copied = sorted(k for k in mapped if k not in report.resampled)
    report.new = sorted(missing)
    return report


def looks_like_mae(sd: StateDict) -> bool:
    return "patch_embed.proj.weight" in sd and "x_embedder.proj.weight" not in sd


def transfer(model: nn.Module, path_or_sd, use_pretrain_layer: int = -1, skip_patch_embed: bool = False,
             which: str = "model", source: str = "<state dict>") -> TransferReport:
    """Transfer a pretrained MAE checkpoint (path or state dict) into ``model`` (DiT/SiT, LightningDiT or
    classifier)."""
    if isinstance(path_or_sd, dict):
        sd = path_or_sd
    else:
        sd, source = read_state_dict(path_or_sd, which=which), str(path_or_sd)
    if isinstance(model, MaskedAutoencoderViT):
        raise TransferError("the target is itself a masked autoencoder: load it with load_weights instead")
    if isinstance(model, LightningDiT):
        return mae_to_lightningdit(model, sd, source, use_pretrain_layer, skip_patch_embed)
    if is_lightning_mae(sd):
        raise TransferError(f"{source} is a LightningMAE (LightningDiT blocks, no cls_token): it transfers into "
                            f"LightningDiT-* only, not into {type(model).__name__}")
    if isinstance(model, DiT):
        return mae_to_dit(model, sd, source, use_pretrain_layer, skip_patch_embed)
    if isinstance(model, VisionTransformer):
        if use_pretrain_layer >= 0:
            raise TransferError("use_pretrain_layer applies to DiT/SiT targets only")
        return mae_to_vit(model, sd, source, skip_patch_embed)
    raise TransferError(f"no transfer into {type(model).__name__}")


def load_pretrained(model: nn.Module, path: str, use_pretrain_layer: int = -1, skip_patch_embed: bool = False,
                    which: str = "auto") -> Optional[TransferReport]:
    """Initialise ``model`` from ``path``: an MAE checkpoint is transferred (report returned); a checkpoint
    of the model's own architecture (e.g. an export of a transferred model) is loaded strictly (None)."""
    sd = read_state_dict(path, which="model" if which == "auto" else which)
    is_classifier_ckpt = "head.weight" in sd or "head.1.weight" in sd
    if looks_like_mae(sd) and not isinstance(model, MaskedAutoencoderViT) and not is_classifier_ckpt:
        return transfer(model, sd, use_pretrain_layer, skip_patch_embed, source=path)
    load_weights(model, path, state_dict=sd)
    return None
