"""REPA's released checkpoints -> the registry's REPA SiT (:class:`usp_scale.models.repa.REPASiT`), strictly.

REPA's train.py saves ``torch.save({"model": model.module.state_dict(), "ema": ema.state_dict(),
"opt": optimizer.state_dict(), "args": args, "steps": global_step}, f"{step:07d}.pt")`` with ``args`` its
``argparse.Namespace``; its released SiT-XL/2 (4M iterations, ``last.pt``) is a bare state dict that generate.py
loads directly. Both read through the project's reader (:func:`usp_scale.transfer.formats.select_state_dict`,
``weights_only`` with the ``argparse.Namespace`` allowlist: nothing in the file runs). Sampling takes the EMA
weights (``which="ema"``, generate.py's choice); ``which="model"`` takes the raw ones.

What builds the model: ``args.model`` (``SiT-B/2``, ``SiT-L/2``, ``SiT-XL/2`` -> ``SiT-*-REPA``),
``args.resolution // 8`` (input size), ``args.num_classes``, ``args.encoder_depth``, ``args.qk_norm``; ``z_dims``
and ``projector_dim`` come from the projector's shapes. A bare state dict has no args: its sizes come from the
shapes and ``encoder_depth`` from the caller (REPA's release: 8) -- the tap position does not change the output,
only the projected tokens. REPA's ``--legacy`` layout (``decoder_blocks.i`` for blocks after the tap) is
converted with :func:`convert_legacy`. Only the linear path is taken (``args.path_type`` "cosine" is refused:
the project's samplers integrate the linear path).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from ..checkpoint.safe_load import torch_load
from ..models import create_model
from .formats import StateDict, load_weights, select_state_dict

# REPA's --model names -> the registry's; "SiT-tiny/2" is the project's test/miniature size in REPA's format
REPA_MODELS = {"SiT-B/2": "SiT-B/2-REPA", "SiT-L/2": "SiT-L/2-REPA", "SiT-XL/2": "SiT-XL/2-REPA",
               "SiT-tiny/2": "SiT-tiny/2-REPA"}
_SIZES = {(768, 12): "B", (1024, 24): "L", (1152, 28): "XL", (128, 2): "tiny"}
_LEGACY = re.compile(r"^decoder_blocks\.(\d+)\.(.*)$")


class REPACheckpointError(ValueError):
    """A REPA checkpoint this project cannot load as REPA's SiT."""


@dataclass
class REPACheckpoint:
    path: str
    state_dict: StateDict
    model_name: str
    model_kwargs: dict
    which: str
    steps: Optional[int] = None
    args: dict = field(default_factory=dict)


def convert_legacy(sd: StateDict, encoder_depth: int) -> StateDict:
    """REPA's ``load_legacy_checkpoints``: ``decoder_blocks.i.*`` -> ``blocks.{i + encoder_depth}.*``."""
    out = {}
    for k, v in sd.items():
        m = _LEGACY.match(k)
        out[f"blocks.{int(m.group(1)) + encoder_depth}.{m.group(2)}" if m else k] = v
    return out


def _shape_kwargs(sd: StateDict, path: str) -> tuple:
    """(model name, kwargs) from the shapes of a REPA SiT state dict."""
    try:
        w = sd["x_embedder.proj.weight"]
        hidden, patch = int(w.shape[0]), int(w.shape[-1])
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        tokens = int(sd["pos_embed"].shape[1])
        num_classes = int(sd["y_embedder.embedding_table.weight"].shape[0]) - 1
    except (KeyError, ValueError, IndexError) as e:
        raise REPACheckpointError(f"{path} is not a REPA SiT state dict (no {e}): expected x_embedder, pos_embed, "
                                  f"y_embedder, blocks.*, projectors.*, final_layer keys") from None
    size = _SIZES.get((hidden, depth))
    name = f"SiT-{size}/{patch}" if size else f"SiT (width {hidden}, depth {depth}, patch {patch})"
    if name not in REPA_MODELS:
        raise REPACheckpointError(f"{path} holds a {name} REPA model; the registry has {sorted(REPA_MODELS)}")
    nproj = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("projectors.")), default=-1)
    if nproj == 0:
        raise REPACheckpointError(f"{path} has no projectors.* keys: it is not a REPA SiT checkpoint")
    z_dims = [int(sd[f"projectors.{i}.4.weight"].shape[0]) for i in range(nproj)]
    kwargs = dict(input_size=int(round(tokens ** 0.5)) * patch, num_classes=num_classes, z_dims=z_dims,
                  projector_dim=int(sd["projectors.0.0.weight"].shape[0]),
                  qk_norm="blocks.0.attn.q_norm.weight" in sd)
    return name, kwargs


def read_repa_checkpoint(path: str, which: str = "ema", encoder_depth: Optional[int] = None) -> REPACheckpoint:
    """Read REPA's train.py checkpoint (or a bare REPA state dict) -> weights + the registry model to build.

    ``encoder_depth``: the tap (1-indexed); taken from ``args`` when the file has them (a different value given
    here is an error), else required for a legacy file and 8 (REPA's default and release) otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"REPA checkpoint not found: {path} (a local file written by REPA's train.py, or its "
                                "released SiT-XL/2 last.pt; nothing is downloaded)")
    obj = torch_load(path, what="REPA checkpoint")
    args = vars(obj["args"]) if isinstance(obj, dict) and hasattr(obj.get("args"), "__dict__") else {}
    bare = isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())
    sd = select_state_dict(obj, path, "auto" if bare else which)   # the release is a bare (EMA) state dict
    if args:
        if args.get("path_type", "linear") != "linear":
            raise REPACheckpointError(f"{path} was trained with --path-type {args['path_type']}; only the linear "
                                      "path (REPA's default) is supported by the project's samplers")
        if args.get("prediction", "v") != "v":
            raise REPACheckpointError(f"{path}: --prediction {args['prediction']} (REPA trains v only)")
        if encoder_depth is not None and encoder_depth != args.get("encoder_depth"):
            raise REPACheckpointError(f"{path} was trained with --encoder-depth {args.get('encoder_depth')}, "
                                      f"encoder_depth={encoder_depth} was asked for")
        encoder_depth = int(args.get("encoder_depth", 8))
    if any(_LEGACY.match(k) for k in sd):
        if encoder_depth is None:
            raise REPACheckpointError(f"{path} is in REPA's legacy layout (decoder_blocks.*): give encoder_depth "
                                      "(the --encoder-depth it was trained with) to map it onto blocks.*")
        sd = convert_legacy(sd, encoder_depth)
    name, kwargs = _shape_kwargs(sd, path)
    if args:
        want = args.get("model")
        if want is not None and want != name:
            raise REPACheckpointError(f"{path}: args.model is {want!r} but the weights are a {name}")
        if "resolution" in args and kwargs["input_size"] != args["resolution"] // 8:
            raise REPACheckpointError(f"{path}: args.resolution {args['resolution']} needs a {args['resolution'] // 8}"
                                      f"-latent model, the weights' position table is {kwargs['input_size']}")
        if "qk_norm" in args and bool(args["qk_norm"]) != kwargs["qk_norm"]:
            raise REPACheckpointError(f"{path}: args.qk_norm={args['qk_norm']} but the weights "
                                      f"{'have' if kwargs['qk_norm'] else 'lack'} q_norm/k_norm")
    kwargs["encoder_depth"] = 8 if encoder_depth is None else int(encoder_depth)
    steps = obj.get("steps") if isinstance(obj, dict) and isinstance(obj.get("steps"), int) else None
    return REPACheckpoint(path=path, state_dict=sd, model_name=REPA_MODELS[name], model_kwargs=kwargs,
                          which=which, steps=steps, args=args)


def load_repa_model(path: str, which: str = "ema", encoder_depth: Optional[int] = None,
                    device=None, **overrides) -> nn.Module:
    """Build the REPA SiT a checkpoint describes and load its weights strictly (errors list keys and shapes);
    ``overrides`` replace model keywords (e.g. ``kernels``)."""
    ck = read_repa_checkpoint(path, which=which, encoder_depth=encoder_depth)
    model = create_model(ck.model_name, **{**ck.model_kwargs, **overrides})
    load_weights(model, path, state_dict=ck.state_dict)
    return model.to(device) if device is not None else model
