"""LDM/CompVis ``AutoencoderKL`` checkpoints (SD-VAE originals, MAR's KL-16, VA-VAE) <-> diffusers' AutoencoderKL.

The original latent-diffusion autoencoder names its weights ``encoder.down.{i}.block.{j}.*``,
``encoder.down.{i}.attn.{j}.{q,k,v,proj_out,norm}`` (1x1 convolutions), ``encoder.mid.{block_1,attn_1,block_2}``,
``decoder.up.{i}.*`` (level i counted from the *highest* resolution, as in the encoder), ``norm_out``,
``nin_shortcut``, ``quant_conv`` and ``post_quant_conv``. diffusers' ``AutoencoderKL`` holds the same network
(GroupNorm(32, eps 1e-6), SiLU, asymmetric-pad stride-2 downsampling, nearest x2 upsampling, single-head attention
with scale C^-1/2) under other names and with linear attention projections; a level with attention becomes an
``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D``. VA-VAE (hustvl/LightningDiT, ``vavae-imagenet256-f16d32-
dinov2``) has attention at its lowest level (16x16 at 256 px) in the encoder *and* the decoder; MAR's KL-16 only in
the encoder; SD-VAE in neither (only in the middle blocks).

:func:`key_table` lists every (LDM key, diffusers key) pair of a layout, so the conversion runs both ways
(:func:`ldm_to_diffusers`, :func:`diffusers_to_ldm`) from one table, and nothing outside it passes silently.

Training checkpoints carry more than the autoencoder. :data:`TRAINING_ONLY` names the families dropped by name
(the loss network of LDM's ``LPIPSWithDiscriminator``; VA-VAE's vision-foundation loss: its frozen DINOv2 and its
projection; see vavae/ldm/models/autoencoder.py and modules/losses/contperceptual.py in hustvl/LightningDiT);
:func:`split_autoencoder` drops those, lists them in the log, and refuses any other key, naming the file.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, List, Optional, Tuple

import torch

log = logging.getLogger("usp_scale.vae")

StateDict = Dict[str, torch.Tensor]

# The families of an LDM autoencoder checkpoint that are not the autoencoder, dropped by name.
TRAINING_ONLY = {
    "loss.": "the training loss (LPIPS network, patch discriminator, logvar)",
    "foundation_model.": "VA-VAE's vision-foundation loss: the frozen DINOv2 it aligns to",
    "linear_proj.": "VA-VAE's vision-foundation loss: the projection of latents to DINOv2 features",
}
AUTOENCODER = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# A whole latent-diffusion checkpoint keeps its autoencoder under this prefix; its other top-level families
# (the UNet, the conditioning model, EMA copies) are not the VAE.
FULL_MODEL_PREFIX = "first_stage_model."

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


# diffusers' attention names before its Attention class (diffusers < 0.14, AttentionBlock): a folder in that layout
# loads through diffusers' own renaming; a single file goes through :func:`rename_deprecated_attention`
_DEPRECATED_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DEPRECATED_ATTN_RX = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")


def rename_deprecated_attention(sd: StateDict) -> Tuple[StateDict, int]:
    """A diffusers-layout state dict with the old attention names (``query``, ``key``, ``value``, ``proj_attn``:
    the same linear layers) renamed as diffusers' ``Attention`` names them (``to_q``, ``to_k``, ``to_v``,
    ``to_out.0``), as diffusers renames them in a folder; returns (state dict, number renamed)."""
    out, n = {}, 0
    for k, v in sd.items():
        m = _DEPRECATED_ATTN_RX.match(k)
        if m:
            k, n = f"{m.group(1)}{_DEPRECATED_ATTN[m.group(2)]}.{m.group(3)}", n + 1
        out[k] = v
    return out, n


class LDMLayoutError(ValueError):
    """An LDM-layout state dict that the conversion cannot place (names the file and the keys)."""


def _indices(sd, pattern: str) -> List[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def ldm_layout(sd: StateDict, source: str = "<state dict>") -> dict:
    """The diffusers ``AutoencoderKL`` config of an LDM-layout autoencoder state dict (architecture keys only)."""
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise LDMLayoutError(f"{source}: no LDM encoder levels encoder.down.0 .. encoder.down.N (found {levels})")
    n = len(levels)
    dec_levels = _indices(sd, r"decoder\.up\.(\d+)\.")
    if dec_levels != levels:
        raise LDMLayoutError(f"{source}: encoder levels {levels} but decoder levels {dec_levels}")
    try:
        blocks = tuple(int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(n))
        latent2 = int(sd["encoder.conv_out.weight"].shape[0])
        latent = int(sd["decoder.conv_in.weight"].shape[1])
    except KeyError as e:
        raise LDMLayoutError(f"{source}: LDM autoencoder key {e.args[0]} is missing") from e
    layers = len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."))
    for i in range(n):
        enc = len(_indices(sd, rf"encoder\.down\.{i}\.block\.(\d+)\."))
        dec = len(_indices(sd, rf"decoder\.up\.{i}\.block\.(\d+)\."))
        if enc != layers or dec != layers + 1:
            raise LDMLayoutError(f"{source}: level {i} has {enc} encoder / {dec} decoder res-blocks; an LDM "
                                 f"autoencoder has {layers} / {layers + 1} at every level")
    if latent2 != 2 * latent:
        raise LDMLayoutError(f"{source}: encoder.conv_out gives {latent2} channels but decoder.conv_in takes "
                             f"{latent}: not a KL autoencoder with double_z (2 x z_channels moments)")
    quant = {k: tuple(sd[k].shape[:2]) for k in ("quant_conv.weight", "post_quant_conv.weight") if k in sd}
    if quant.get("quant_conv.weight", (latent2, latent2)) != (latent2, latent2) or \
            quant.get("post_quant_conv.weight", (latent, latent)) != (latent, latent):
        raise LDMLayoutError(f"{source}: quant_conv / post_quant_conv (out, in) channels {quant} differ from the "
                             f"encoder's {latent2} moments and the decoder's {latent} latent channels: an LDM "
                             f"embed_dim different from z_channels has no diffusers AutoencoderKL")
    enc_attn = [i for i in range(n) if f"encoder.down.{i}.attn.0.q.weight" in sd]
    dec_attn = [i for i in range(n) if f"decoder.up.{i}.attn.0.q.weight" in sd]
    return {
        "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
        "down_block_types": tuple("AttnDownEncoderBlock2D" if i in enc_attn else "DownEncoderBlock2D"
                                  for i in range(n)),
        # diffusers' up block k is LDM's level n - 1 - k
        "up_block_types": tuple("AttnUpDecoderBlock2D" if n - 1 - k in dec_attn else "UpDecoderBlock2D"
                                for k in range(n)),
        "block_out_channels": blocks,
        "layers_per_block": layers,
        "latent_channels": latent,
        "norm_num_groups": 32,  # LDM's Normalize: GroupNorm(32) everywhere
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }


def key_table(cfg: dict) -> List[Tuple[str, str, bool]]:
    """Every (LDM key, diffusers key, is a 1x1-conv <-> linear weight) of a diffusers AutoencoderKL ``cfg``."""
    n = len(cfg["block_out_channels"])
    layers = int(cfg["layers_per_block"])
    blocks = list(cfg["block_out_channels"])
    rows: List[Tuple[str, str, bool]] = []

    def conv(a: str, b: str):
        rows.extend([(f"{a}.weight", f"{b}.weight", False), (f"{a}.bias", f"{b}.bias", False)])

    def resnet(a: str, b: str, cin: int, cout: int):
        for x, y in _RESNET.items():
            if x == "nin_shortcut" and cin == cout:
                continue
            conv(f"{a}.{x}", f"{b}.{y}")

    def attn(a: str, b: str):
        for x, y in _ATTN.items():
            rows.append((f"{a}.{x}.weight", f"{b}.{y}.weight", x != "norm"))
            rows.append((f"{a}.{x}.bias", f"{b}.{y}.bias", False))

    def mid(part: str, ch: int):
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", ch, ch)
        if cfg.get("mid_block_add_attention", True):
            attn(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", ch, ch)

    conv("encoder.conv_in", "encoder.conv_in")
    cin = blocks[0]
    for i in range(n):
        with_attn = cfg["down_block_types"][i] == "AttnDownEncoderBlock2D"
        for j in range(layers):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", cin, blocks[i])
            cin = blocks[i]
            if with_attn:
                attn(f"encoder.down.{i}.attn.{j}", f"encoder.down_blocks.{i}.attentions.{j}")
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    mid("encoder", blocks[-1])
    conv("encoder.norm_out", "encoder.conv_norm_out")
    conv("encoder.conv_out", "encoder.conv_out")
    if cfg.get("use_quant_conv", True):
        conv("quant_conv", "quant_conv")
    if cfg.get("use_post_quant_conv", True):
        conv("post_quant_conv", "post_quant_conv")
    conv("decoder.conv_in", "decoder.conv_in")
    mid("decoder", blocks[-1])
    cin = blocks[-1]
    for k in range(n):
        i = n - 1 - k
        with_attn = cfg["up_block_types"][k] == "AttnUpDecoderBlock2D"
        for j in range(layers + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", cin, blocks[i])
            cin = blocks[i]
            if with_attn:
                attn(f"decoder.up.{i}.attn.{j}", f"decoder.up_blocks.{k}.attentions.{j}")
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv")
    conv("decoder.norm_out", "decoder.conv_norm_out")
    conv("decoder.conv_out", "decoder.conv_out")
    return rows


def _convert(sd: StateDict, rows, src: int, source: str, what: str) -> StateDict:
    have = set(sd)
    want = {r[src] for r in rows}
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise LDMLayoutError(f"{source}: the {what} keys do not form the autoencoder their shapes describe: "
                             f"missing {len(missing)} {missing[:8]}, unexpected {len(unexpected)} {unexpected[:8]}")
    out: StateDict = {}
    for row in rows:
        v = sd[row[src]]
        if row[2]:  # attention projection: LDM 1x1 conv (C, C, 1, 1) <-> diffusers linear (C, C)
            v = v.reshape(v.shape[0], v.shape[1]) if src == 0 else v.reshape(v.shape[0], v.shape[1], 1, 1)
        out[row[1 - src]] = v
    return out


def ldm_to_diffusers(sd: StateDict, source: str = "<state dict>") -> Tuple[StateDict, dict]:
    """LDM-layout autoencoder weights -> (diffusers AutoencoderKL weights, its architecture config). Every key
    of ``sd`` must have its place (training-only families are removed first, by :func:`split_autoencoder`)."""
    cfg = ldm_layout(sd, source)
    return _convert(sd, key_table(cfg), 0, source, "LDM"), cfg


def diffusers_to_ldm(sd: StateDict, cfg: dict, source: str = "<state dict>") -> StateDict:
    """diffusers AutoencoderKL weights of architecture ``cfg`` -> the LDM key layout (the inverse of
    :func:`ldm_to_diffusers`; LDM itself always uses 32 GroupNorm groups)."""
    return _convert(sd, key_table(cfg), 1, source, "diffusers")


def split_autoencoder(sd: StateDict, source: str = "<state dict>"
                      ) -> Tuple[StateDict, Dict[str, int]]:
    """(the autoencoder's weights, {dropped family: number of tensors}) of a checkpoint's state dict.

    The autoencoder is found at the top level or under one wrapper prefix (``first_stage_model.`` of a whole
    latent-diffusion checkpoint, ``vae.``, ``module.``, ``model.``). Under that prefix the
    :data:`TRAINING_ONLY` families are dropped by name; in a whole latent-diffusion checkpoint the top-level
    families outside ``first_stage_model.`` (UNet, conditioning model, EMA) are not the VAE and are dropped by
    family too. Every dropped family is listed in the log. Any other key is an error naming ``source``."""
    prefix = _vae_prefix(sd)
    if prefix is None:
        raise LDMLayoutError(f"{source} holds no VAE weights (no encoder.*/decoder.* keys, also under "
                             f"first_stage_model./vae./module./model.)")
    vae: StateDict = {}
    dropped: Dict[str, int] = {}
    other: List[str] = []
    for k, v in sd.items():
        if not k.startswith(prefix):
            if prefix == FULL_MODEL_PREFIX:
                fam = k.split(".", 1)[0] + "."
                dropped[fam] = dropped.get(fam, 0) + 1
                continue
            other.append(k)
            continue
        rest = k[len(prefix):]
        if rest.startswith(AUTOENCODER):
            vae[rest] = v
            continue
        fam = next((f for f in TRAINING_ONLY if rest.startswith(f)), None)
        if fam is None:
            other.append(k)
        else:
            dropped[prefix + fam] = dropped.get(prefix + fam, 0) + 1
    if other:
        raise LDMLayoutError(f"{source}: {len(other)} keys are neither the autoencoder "
                             f"({', '.join(prefix + a + '*' for a in AUTOENCODER)}) nor a training-only family "
                             f"({', '.join(prefix + f + '*' for f in TRAINING_ONLY)}): {sorted(other)[:10]}. "
                             f"Is this a VAE checkpoint?")
    for fam, count in sorted(dropped.items()):
        why = TRAINING_ONLY.get(fam[len(prefix):], "not the VAE (rest of a whole latent-diffusion checkpoint)")
        log.info("VAE %s: dropped %d tensors of %s* (%s)", source, count, fam, why)
    return vae, dropped


def _vae_prefix(sd: StateDict) -> Optional[str]:
    for p in ("", FULL_MODEL_PREFIX, "vae.", "module.", "model."):
        if any(k.startswith(p + "encoder.") for k in sd) and any(k.startswith(p + "decoder.") for k in sd):
            return p
    return None
