"""REPA teacher weights from local files: DINOv2 ViT-B/14 (no registers) in the official torch.hub format and in
timm's, loaded strictly into :class:`usp_scale.models.teacher.DINOv2ViT` and returned frozen
(:class:`usp_scale.models.teacher.FrozenTeacher`). Nothing is ever downloaded: the models know nothing of files,
and this module is where the teacher's files are read (beside the other weight formats, :mod:`.formats`).

Formats (both a bare state dict):

- **hub**: ``dinov2_vitb14_pretrain.pth`` as ``torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14")``
  downloads it (:data:`HUB_URL`) and loads it with ``strict=True`` into dinov2's ``vit_base`` (img_size 518,
  patch 14, LayerScale, ``block_chunks=0``): 175 tensors, ``cls_token`` (1, 1, 768), ``pos_embed`` (1, 1370, 768)
  (cls + 37 x 37), ``mask_token`` (1, 768), ``patch_embed.proj.{weight,bias}`` ((768, 3, 14, 14)),
  ``blocks.{0..11}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}``,
  ``blocks.{i}.ls1.gamma``, ``blocks.{i}.ls2.gamma``, ``norm.{weight,bias}``.
- **timm**: ``vit_base_patch14_dinov2.lvd142m`` (``model.safetensors`` / ``pytorch_model.bin``): the same keys
  without ``mask_token`` (timm's ``_convert_dinov2`` drops it; it is read only by DINOv2's masked training).

At load the position table is resampled from the checkpoint's grid to the teacher's (37 x 37 -> 16 x 16 for 224 px
input) exactly as REPA's ``load_encoders`` does it, with timm's ``resample_abs_pos_embed`` defaults: the cls row
kept, the grid bicubic with **antialias**, align_corners False, in fp32. (DINOv2's own forward-time interpolation
would differ: no antialias and a 0.1 offset; REPA never reaches it because the table already fits.)
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from ..checkpoint.safe_load import check_finite, read_safetensors, torch_load
from ..layers.pos_embed import resample_grid
from .. import assets
from ..models.teacher import TEACHERS, DINOv2ViT, FrozenTeacher, teacher_input_size
from .formats import StateDict

HUB_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"
TIMM_NAME = "timm/vit_base_patch14_dinov2.lvd142m"
DEFAULT_PATH = os.path.join("weights", "dinov2_vitb14_pretrain.pth")
HUB_ONLY = ("mask_token",)
ASSET_KIND = "teacher"          # usp_scale/assets/teacher/<name>/: teachers the project trains and ships
ASSET_WEIGHTS = "model.safetensors"


class TeacherWeightsError(ValueError):
    """A teacher checkpoint that does not fit the teacher's architecture."""


def hub_to_timm(sd: StateDict) -> StateDict:
    """Official hub keys -> timm's (drop ``mask_token``), as timm's ``_convert_dinov2`` does for no registers."""
    return {k: v for k, v in sd.items() if k not in HUB_ONLY}


def timm_to_hub(sd: StateDict, mask_token: Optional[torch.Tensor] = None) -> StateDict:
    """timm keys -> the hub's: adds ``mask_token`` (zeros, DINOv2's init, unless given: timm does not keep it)."""
    if "mask_token" in sd:
        raise TeacherWeightsError("timm_to_hub: the state dict already has mask_token (it is in the hub format)")
    d = sd["cls_token"].shape[-1]
    mt = torch.zeros(1, d, dtype=sd["cls_token"].dtype) if mask_token is None else mask_token
    return {**sd, "mask_token": mt}


def expected_keys(name: str = "dinov2_vitb14", fmt: str = "timm") -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of a checkpoint of teacher ``name`` in ``fmt`` ("hub" or "timm"), at the checkpoint's 37 x 37
    grid (518 px; the position table of a file may have any square grid)."""
    with torch.device("meta"):
        net = DINOv2ViT(TEACHERS[name], grid=37)
    keys = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if fmt == "hub":
        keys["mask_token"] = (1, TEACHERS[name].embed_dim)
    return keys


def _read(path: str) -> StateDict:
    if path.endswith(".safetensors"):
        obj = read_safetensors(path, what="teacher weights")
    else:
        obj = torch_load(path, what="teacher weights")
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        top = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise TeacherWeightsError(f"teacher weights {path}: expected a bare state dict (the official "
                                  f"dinov2_vitb14_pretrain.pth or timm's model.safetensors), got {top}")
    check_finite(obj, path, what="teacher weights")
    return dict(obj)


def _missing_file_message(path: str, name: str) -> str:
    return (f"REPA teacher weights not found: {path}. Nothing is downloaded at run time. Put the {name} weights "
            f"there (or point repa.teacher_path at them): the official torch.hub file ({HUB_URL}) or timm's "
            f"{TIMM_NAME} model.safetensors; the default place is {DEFAULT_PATH}. Shipped teachers, named without a "
            f"path: {', '.join(assets.names(ASSET_KIND)) or 'none'}")


def shipped_teacher_path(path: str, name: str) -> str:
    """A shipped teacher's name (``synthetic-vit``, a folder of usp_scale/assets/teacher/) -> its weights file, after
    the sha256 check and the check that it was trained as architecture ``name``; any other ``path`` unchanged."""
    if not assets.is_asset(ASSET_KIND, path):
        return path
    folder = assets.verified_dir(ASSET_KIND, path)
    arch = assets.read_meta(ASSET_KIND, path).get("teacher")
    if arch != name:
        raise TeacherWeightsError(f"shipped teacher {path!r} ({folder}) is a {arch!r} network, the teacher "
                                  f"architecture asked for is {name!r}: set repa.teacher={arch}")
    return os.path.join(folder, ASSET_WEIGHTS)


def load_teacher(path: str, *, name: str = "dinov2_vitb14", image_size: int = 256,
                 input_size: Optional[int] = None, device="cpu") -> FrozenTeacher:
    """Read ``path`` (hub or timm format, detected by ``mask_token``; or the name of a shipped teacher,
    :func:`shipped_teacher_path`), check it strictly against teacher ``name``, resample its position table to the
    input grid and return the frozen teacher.

    ``input_size``: the teacher's input side, default REPA's ``224 * (image_size // 256)`` (a shipped small teacher:
    its own rule, :func:`usp_scale.models.teacher.teacher_input_size`). Raises :class:`FileNotFoundError` (where to
    put the file) or :class:`TeacherWeightsError` naming the file and the first differing keys (missing, extra,
    wrong patch size, wrong shapes)."""
    if name not in TEACHERS:
        raise TeacherWeightsError(f"unknown teacher {name!r}; known: {', '.join(sorted(TEACHERS))}")
    path = shipped_teacher_path(path, name)
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(_missing_file_message(path, name))
    spec = TEACHERS[name]
    input_size = teacher_input_size(name, image_size) if input_size is None else int(input_size)
    if input_size % spec.patch_size:
        raise TeacherWeightsError(f"teacher input size {input_size} px is not a multiple of {name}'s patch size "
                                  f"{spec.patch_size}")
    sd = _read(path)
    fmt = "hub" if "mask_token" in sd else "timm"
    want = expected_keys(name, fmt)
    w = sd.get("patch_embed.proj.weight")
    if w is not None and tuple(w.shape) != want["patch_embed.proj.weight"]:
        raise TeacherWeightsError(
            f"teacher weights {path}: patch_embed.proj.weight has shape {tuple(w.shape)} (patch size "
            f"{tuple(w.shape[-2:])}), {name} has {want['patch_embed.proj.weight']} (patch {spec.patch_size}, width "
            f"{spec.embed_dim}): this is not a {name} checkpoint")
    missing = [k for k in want if k not in sd]           # in the architecture's order
    extra = [k for k in sd if k not in want]             # in the file's order
    if missing or extra:
        raise TeacherWeightsError(
            f"teacher weights {path} ({fmt} format, {len(sd)} tensors) do not fit {name} ({len(want)} expected): "
            + (f"missing {len(missing)}: {missing[:6]}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {len(extra)}: {extra[:6]}" if extra else "")
            + (". A checkpoint with registers (dinov2_vitb14_reg) is not REPA's teacher" if any(
                "register" in k or "reg_token" in k for k in extra) else ""))
    bad = [f"{k} {tuple(sd[k].shape)} vs {s}" for k, s in want.items() if k != "pos_embed" and tuple(sd[k].shape) != s]
    pos = sd["pos_embed"]
    g0 = int(round((pos.shape[1] - 1) ** 0.5)) if pos.ndim == 3 else -1
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != spec.embed_dim or g0 * g0 != pos.shape[1] - 1:
        bad.insert(0, f"pos_embed {tuple(pos.shape)} vs (1, 1 + G*G, {spec.embed_dim})")
    if bad:
        raise TeacherWeightsError(f"teacher weights {path} ({fmt} format) have shapes that do not fit {name}: "
                                  + "; ".join(bad[:6]))
    grid = input_size // spec.patch_size
    net = DINOv2ViT(spec, grid=grid)
    state = hub_to_timm(sd)
    state["pos_embed"] = resample_pos_embed(pos, grid)
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    teacher = FrozenTeacher(net, name=name, image_size=image_size, source=os.path.abspath(path))
    return teacher.to(device)


def resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + G*G, D) -> (1, 1 + grid*grid, D): cls row kept, grid bicubic with antialias (timm's
    ``resample_abs_pos_embed`` defaults, what REPA applies to DINOv2); unchanged when G == grid."""
    g0 = int(round((pos.shape[1] - 1) ** 0.5))
    if g0 == grid:
        return pos
    return torch.cat([pos[:, :1], resample_grid(pos, grid, num_prefix=1, antialias=True)], dim=1)
