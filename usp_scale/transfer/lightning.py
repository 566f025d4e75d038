"""Pretrained LightningMAE (models/lightning_mae.py) -> LightningDiT, with the key accounting of transfer/report.py.

The MAE's encoder blocks are LightningDiT blocks without adaLN, so every transformer weight is copied unchanged:
``blocks.i.{norm1, attn.qkv, attn.proj, attn.q_norm, attn.k_norm, norm2, mlp.w12, mlp.w3}`` and the patch
embedding ``patch_embed.proj`` -> ``x_embedder.proj``. The frozen sin-cos ``pos_embed`` (no class row) is copied,
or resampled bicubically when the MAE was pretrained on another grid (USP pretrains at 224 px: 14 x 14 VA-VAE
latents, LightningDiT trains at 256 px: 16 x 16). Fresh: the timestep and label embedders, every
``adaLN_modulation`` and the final layer (LightningDiT's init: zeroed adaLN and output, N(0, 0.02) embedders),
and the RoPE tables ``feat_rope.*``, which are a fixed function of the target's grid. Dropped: the decoder, the mask
token, the encoder's final ``norm`` and the MAE's own RoPE tables. Any other difference (a ViT-block MAE, QK-norm
on one side only, another width) is an error naming the keys.
"""
from __future__ import annotations

import torch

from ..layers.pos_embed import resample_grid
from ..models.lightningdit import LightningDiT
from .formats import StateDict
from .report import (_BLOCK, _MAE_ONLY, TransferError, TransferReport, _check_source, _depth, _patch_embed,
                     copy_mapped)

_FIXED = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")


def is_lightning_mae(sd: StateDict) -> bool:
    """A LightningMAE checkpoint: an MAE without class token whose blocks are LightningDiT blocks (SwiGLU ``w12``,
    or a RoPE table)."""
    return ("patch_embed.proj.weight" in sd and "cls_token" not in sd
            and ("blocks.0.mlp.w12.weight" in sd or "feat_rope.freqs_cos" in sd))


def mae_to_lightningdit(model: LightningDiT, sd: StateDict, source: str = "<state dict>",
                        use_pretrain_layer: int = -1, skip_patch_embed: bool = False) -> TransferReport:
    """Load a LightningMAE encoder into a LightningDiT in place and return the report."""
    _check_source(sd, source)
    if "cls_token" in sd:
        raise TransferError(f"{source} is a USP ViT MAE (it has cls_token, LayerNorm and GELU blocks): it cannot "
                            f"initialise LightningDiT exactly; pretrain a LightningMAE-* (models/lightning_mae.py)")
    report = TransferReport(source, f"LightningDiT (depth {model.depth}, width {model.hidden_size})")
    own = model.state_dict()
    depth, keep = model.depth, model.depth if use_pretrain_layer < 0 else use_pretrain_layer
    if use_pretrain_layer > depth:
        raise TransferError(f"use_pretrain_layer={use_pretrain_layer} exceeds the model depth {depth}")
    if _depth(sd) < keep:
        raise TransferError(f"{source} has {_depth(sd)} blocks but {keep} are to be loaded into a depth-{depth} model")
    mapped: StateDict = {}
    _patch_embed(sd, own["x_embedder.proj.weight"], "x_embedder", skip_patch_embed, report, mapped)

    pos, grid = sd["pos_embed"], model.x_embedder.grid_size
    src_grid = int(round(pos.shape[1] ** 0.5))
    if src_grid * src_grid != pos.shape[1]:
        raise TransferError(f"{source}: pos_embed {tuple(pos.shape)} is not (1, G*G, D) (a LightningMAE has no "
                            f"class-token row)")
    mapped["pos_embed"] = resample_grid(pos, grid)
    if src_grid != grid:
        report.resampled["pos_embed"] = f"{src_grid}x{src_grid} -> {grid}x{grid} bicubic"

    for k, v in sd.items():
        m = _BLOCK.match(k)
        if m:
            (mapped.__setitem__(k, v) if int(m.group(1)) < keep else report.dropped.append(k))
        elif k in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"):
            continue
        elif k in ("norm.weight", "norm.bias") or k in _FIXED or _MAE_ONLY.match(k):
            report.dropped.append(k)
        else:
            raise TransferError(f"{source}: unexpected key {k!r} {tuple(v.shape)} in a LightningMAE checkpoint")

    unknown = sorted(set(mapped) - set(own))
    if unknown:
        raise TransferError(f"{source}: keys with no place in {report.target}: {', '.join(unknown[:10])} (block "
                            f"options differ: QK-norm, SwiGLU or RMSNorm on one side only?)")
    expected_new = {k for k in own if k.startswith(("t_embedder.", "y_embedder.", "final_layer."))
                    or ".adaLN_modulation." in k or k in _FIXED}
    expected_new |= {k for k in own if (m := _BLOCK.match(k)) and int(m.group(1)) >= keep}
    if "x_embedder.proj.weight" not in mapped:
        expected_new |= {"x_embedder.proj.weight", "x_embedder.proj.bias"}
    missing = copy_mapped(own, mapped, expected_new, source, report.target)
    with torch.no_grad():
        for k in missing:  # LightningDiT's init for the new parts: zeroed adaLN and output layer
            if ".adaLN_modulation." in k or (k.startswith("final_layer.") and not k.startswith("final_layer.norm")):
                own[k].zero_()
    model.pos_embed.requires_grad_(False)
    report.copied = sorted(k for k in mapped if k not in report.resampled)
    report.new = sorted(missing)
    if model.feat_rope is not None:
        report.notes.append(f"feat_rope.*: the target's own RoPE tables for its {grid}x{grid} grid (fixed, not "
                            f"learned)")
    if use_pretrain_layer >= 0:
        report.notes.append(f"use_pretrain_layer={use_pretrain_layer}: blocks >= {keep} keep their init")
    return report

