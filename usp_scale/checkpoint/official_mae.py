"""Reading the official MAE/USP pretraining checkpoint as a run to continue: its optimizer state in our grouping.

The official pretraining code (MAE's ``main_pretrain.py``, which USP keeps) saves ``checkpoint-{epoch}.pth`` =
``{"model", "optimizer", "epoch", "scaler", "args"}``:

* ``model``: the MAE state dict (our MAE's keys, docs/method.md §1);
* ``optimizer``: ``torch.optim.AdamW`` over timm's ``param_groups_weight_decay(model, wd)``: TWO groups,
  ``[no decay, decay]``, each listing the trainable parameters (``requires_grad``; the frozen sin-cos tables are not
  in it) in ``model.named_parameters()`` order; a parameter has no decay when it has ``ndim <= 1`` or its name ends
  in ``.bias``. The state is keyed by the running index over both groups;
* ``epoch``: the last finished epoch (the official resume starts at ``epoch + 1``);
* ``scaler``: the fp16 ``GradScaler`` state (``scale``, ``_growth_tracker``, ...);
* ``args``: the run's ``argparse.Namespace``.

The official optimizer state names no parameter: which index is which parameter follows from the rule above and the
parameter order, which the file itself records (its ``model`` dict is the official ``state_dict()``, parameters in
registration order). :func:`official_mae_param_names` rebuilds that order; :func:`optimizer_state_from_official`
re-keys the state onto our optimizer's groups by name, checking every count and shape against the file.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .safe_load import torch_load

KEYS = ("model", "optimizer", "epoch")          # what an official pretraining checkpoint must hold
OPTIONAL = ("scaler", "args")
# the args of the official run that this import compares with the config it continues under (informational)
ARGS_COMPARED = ("model", "epochs", "blr", "lr", "min_lr", "warmup_epochs", "weight_decay", "mask_ratio",
                 "norm_pix_loss", "batch_size", "accum_iter", "input_size")


class OfficialImportError(ValueError):
    """An official checkpoint that cannot be continued here (names the file, key and what would fix it)."""


def read_official_mae(path: str) -> dict:
    """The official pretraining checkpoint ``path`` as a dict, refused (naming what is missing) unless it holds
    ``model``, ``optimizer`` and ``epoch``; ``args`` (a Namespace in the official files) comes back as a dict."""
    ck = torch_load(path, what="official MAE pretraining checkpoint")
    if not isinstance(ck, dict):
        raise OfficialImportError(f"{path}: not an official pretraining checkpoint (a {type(ck).__name__}, not a "
                                  "dict with model, optimizer, epoch, scaler, args)")
    missing = [k for k in KEYS if k not in ck]
    if missing:
        hint = (" It holds model weights only (an export): use checkpoint.init_from to start from its weights."
                if "model" in ck else "")
        raise OfficialImportError(f"{path}: no {', '.join(repr(k) for k in missing)}; the official pretraining "
                                  f"checkpoint (checkpoint-N.pth) holds {', '.join(KEYS + OPTIONAL)}.{hint}")
    out = dict(ck)
    args = ck.get("args")
    out["args"] = vars(args) if hasattr(args, "__dict__") else (dict(args) if isinstance(args, dict) else {})
    try:
        out["epoch"] = int(ck["epoch"])
    except (TypeError, ValueError):
        raise OfficialImportError(f"{path}: 'epoch' is {ck['epoch']!r}, not an epoch number") from None
    return out


def no_weight_decay(name: str, shape: Sequence[int]) -> bool:
    """timm's ``param_groups_weight_decay`` rule (no extra skip list: the official MAE passes none)."""
    return len(shape) <= 1 or name.endswith(".bias")


def official_mae_param_names(model_sd: Dict[str, torch.Tensor], trainable: Sequence[str]) -> List[List[str]]:
    """The parameter names of the official optimizer's two groups, ``[no decay, decay]``, each in the order of the
    official ``state_dict`` (``model_sd``, the checkpoint's ``model``), over the ``trainable`` names (the official
    code leaves ``requires_grad=False`` tensors out)."""
    train = set(trainable)
    names = [n for n in model_sd if n in train]
    return [[n for n in names if no_weight_decay(n, model_sd[n].shape)],
            [n for n in names if not no_weight_decay(n, model_sd[n].shape)]]


def optimizer_state_from_official(official: dict, official_groups: List[List[str]], ours: dict,
                                  shapes: Dict[str, Sequence[int]], source: str = "") -> dict:
    """``ours`` (our optimizer's ``state_dict()``: groups with ``param_names``) with its ``state`` replaced by the
    official optimizer's state, matched by parameter name through ``official_groups`` (the names of the official
    groups' parameters, :func:`official_mae_param_names`). Our groups' hyper-parameters stay ours (the schedule sets
    the lr at every step anyway). Refused, naming the file, when the group sizes differ, a parameter is missing on
    either side, or a moment's shape is not its parameter's (``shapes``: name -> shape)."""
    groups = official.get("param_groups")
    state = official.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise OfficialImportError(f"{source}: 'optimizer' is not a torch optimizer state dict (no param_groups/state)")
    sizes = [len(g.get("params", [])) for g in groups]
    want = [len(g) for g in official_groups]
    if sizes != want:
        raise OfficialImportError(
            f"{source}: the official optimizer has groups of {sizes} parameters; the official MAE grouping of this "
            f"model's trainable parameters ([no decay, decay]: ndim <= 1 or a '.bias' name) gives {want}. The "
            "checkpoint is from another model or another optimizer grouping; nothing was imported")
    by_name: Dict[str, dict] = {}
    for g, names in zip(groups, official_groups):
        for idx, name in zip(g["params"], names):
            if idx in state:
                by_name[name] = state[idx]
    for g in ours["param_groups"]:
        if "param_names" not in g:
            raise OfficialImportError(f"{source}: our optimizer groups carry no param_names (an optimizer not built "
                                      "by usp_scale.training.optim)")
    our_names = [n for g in ours["param_groups"] for n in g["param_names"]]
    official_names = [n for names in official_groups for n in names]
    if sorted(our_names) != sorted(official_names):
        only_ours = sorted(set(our_names) - set(official_names))[:5]
        only_theirs = sorted(set(official_names) - set(our_names))[:5]
        raise OfficialImportError(f"{source}: the trainable parameters differ (only in this model: {only_ours}; only "
                                  f"in the official optimizer: {only_theirs})")
    new_state = {}
    for g in ours["param_groups"]:
        for idx, name in zip(g["params"], g["param_names"]):
            st = by_name.get(name)
            if st is None:
                continue  # no step taken for it in the official run: no state, as there
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st and tuple(st[k].shape) != tuple(shapes[name]):
                    raise OfficialImportError(f"{source}: optimizer state {k} of {name!r} has shape "
                                              f"{tuple(st[k].shape)}, the parameter {tuple(shapes[name])}")
            new_state[idx] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
    return {"state": new_state, "param_groups": ours["param_groups"]}


def official_hyperparameters(official: dict) -> dict:
    """The official optimizer's hyper-parameters per group (lr, betas, eps, weight_decay), for the import's log."""
    keep = ("lr", "betas", "eps", "weight_decay")
    return {i: {k: g[k] for k in keep if k in g} for i, g in enumerate(official.get("param_groups", []))}
