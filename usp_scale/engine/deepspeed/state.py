"""DeepSpeed's two parts of the engine: :class:`ZeroWeights` (the EMA over ZeRO partitions, the gathered fp32 model
and optimizer state) and :class:`DeepSpeedState` (checkpoint save/load in DeepSpeed's own layout).

Everything here goes through DeepSpeed's public API (``save_checkpoint`` / ``load_checkpoint``,
``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_local_fp32_param`` / ``safe_get_full_optimizer_state``,
``deepspeed.zero.GatheredParameters``) except three spots for which DeepSpeed 0.19 has none. Each sits in one
function below (marked "DeepSpeed internals"), names what it reads and why, raises :class:`DeepSpeedInternalsError`
when the attribute is gone, and is checked against the installed DeepSpeed by ``tests/test_deepspeed_state.py``:

* :func:`master_fragment`: ``param._hp_mapping``, this rank's slice of the ZeRO-1/2 fp32 master partition (the
  public local accessors are ZeRO-3 only);
* :func:`link_optimizer_states`: the ZeRO-1/2 optimizer's ``optimizer`` / ``bit16_groups`` /
  ``single_partition_of_fp32_groups`` (``bf16_groups`` / ``fp32_groups_flat_partition`` in ``BF16_Optimizer``), to
  link the optimizer state of every param group (DeepSpeed links only those that have state after its first step);
* :func:`zero3_partition`: the ZeRO-3 parameter attributes ``ds_tensor`` / ``ds_numel`` / ``ds_shape``.

Layouts (``w`` ranks of the data-parallel group, parameter ``p`` with ``n`` elements):

* ZeRO-3: each rank holds a padded partition of ``ceil(n / w)``-ish elements (``zero3_partition``); the EMA
  follows the fp32 partition (``safe_get_local_fp32_param``), a 1-D tensor of at most that size.
* ZeRO-1/2 in bf16/fp16: each rank holds a contiguous fragment ``[start, start + numel)`` of ``p.view(-1)`` in its
  fp32 master partition (``master_fragment``; ``numel`` may be 0); fragments of all ranks are disjoint and cover
  ``p``.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ... import runtime as D
from ...checkpoint.safe_load import torch_load
from ...fileio import torch_save, write_text
from ...config import ConfigError
from ..base import Weights
from . import DEEPSPEED_RANGE

TAG = "ds"  # DeepSpeed checkpoint tag: <engine folder>/ds/...
LATEST = "latest"  # DeepSpeed's file naming the newest tag (what zero_to_fp32.py and load_checkpoint(tag=None) read)


class DeepSpeedInternalsError(RuntimeError):
    """The installed DeepSpeed lacks an internal attribute usp_scale reads (see this module's docstring)."""


def _internals_error(what: str, why: str) -> DeepSpeedInternalsError:
    import deepspeed

    return DeepSpeedInternalsError(f"DeepSpeed {deepspeed.__version__}: {what} not found ({why}); usp_scale is "
                                   f"tested with deepspeed{DEEPSPEED_RANGE}: install a version in that range")


# ---------------------------------------------------------------- DeepSpeed internals (one function each)
def master_fragment(p: nn.Parameter, name: str = "") -> Optional[Tuple[torch.Tensor, int]]:
    """ZeRO-1/2 (and ``BF16_Optimizer``): ``(fragment, start)``, the 1-D fp32 view of this rank's fp32 master
    partition holding elements ``[start, start + fragment.numel())`` of ``p.view(-1)``; None when no element of
    ``p`` lives on this rank.

    DeepSpeed internals: ``p._hp_mapping``, the ``tensor_fragment`` that ``deepspeed.utils.link_hp_params`` sets on
    every parameter (None on ranks without a fragment); its ``get_hp_fragment()`` is the master slice and
    ``lp_fragment_address.start`` its offset in the parameter. DeepSpeed's public accessors of a local fp32
    partition (``safe_get_local_fp32_param``) are ZeRO-3 only; the full ones gather (a collective per read)."""
    if not hasattr(p, "_hp_mapping"):
        raise _internals_error(f"param._hp_mapping of {name or 'a parameter'!r}", "the link from a ZeRO-1/2 "
                               "parameter to its fp32 master fragment; is the parameter missing from the optimizer's "
                               "param groups?")
    m = p._hp_mapping
    if m is None:
        return None
    frag = m.get_hp_fragment()
    return frag, int(m.lp_fragment_address.start)


def link_optimizer_states(zero_optimizer) -> None:
    """ZeRO-1/2: (re)link every parameter to its fragment of the optimizer state, so that
    ``safe_get_full_optimizer_state`` works for every param group.

    DeepSpeed links them once, right after the inner optimizer steps the first param group, when the later groups
    have no state yet: the parameters of group 2 onward (e.g. the no-weight-decay group) stay without optimizer
    state ("exp_avg not found in optimizer state fragment"). DeepSpeed internals: the wrapper's inner torch
    optimizer ``optimizer`` and its per-group lists of low-precision parameters and flat fp32 partitions,
    ``bit16_groups`` / ``single_partition_of_fp32_groups`` (``DeepSpeedZeroOptimizer``) or ``bf16_groups`` /
    ``fp32_groups_flat_partition`` (``BF16_Optimizer``); DeepSpeed's own ``lazy_init_hp_params_optimizer_state``
    (public, in ``deepspeed.utils``) does the linking."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    inner = getattr(zero_optimizer, "optimizer", None)
    lps = getattr(zero_optimizer, "bit16_groups", None) or getattr(zero_optimizer, "bf16_groups", None)
    flats = getattr(zero_optimizer, "single_partition_of_fp32_groups", None) or \
        getattr(zero_optimizer, "fp32_groups_flat_partition", None)
    if inner is None or lps is None or flats is None:
        raise _internals_error(f"{type(zero_optimizer).__name__}.optimizer / bit16_groups / "
                               "single_partition_of_fp32_groups", "the ZeRO-1/2 optimizer's param groups and fp32 "
                               "partitions, needed to export its optimizer state")
    for lp, flat in zip(lps, flats):
        if len(inner.state.get(flat, {})):
            lazy_init_hp_params_optimizer_state(lp, flat, inner.state)


def zero3_partition(p: nn.Parameter) -> Tuple[int, int, torch.Size]:
    """ZeRO-3: ``(partition numel, full numel, full shape)`` of a partitioned parameter; the partition size is
    padded, the same on every rank, and ``world * partition >= full numel``.

    DeepSpeed internals: the attributes ZeRO-3 sets on every partitioned parameter, ``ds_tensor`` (this rank's
    partition), ``ds_numel`` and ``ds_shape`` (the full parameter's; ``p.shape`` itself is empty)."""
    if not all(hasattr(p, a) for a in ("ds_tensor", "ds_numel", "ds_shape")):
        raise _internals_error("param.ds_tensor / ds_numel / ds_shape", "the ZeRO-3 partition of a parameter")
    return p.ds_tensor.numel(), int(p.ds_numel), torch.Size(p.ds_shape)


# ---------------------------------------------------------------- EMA over partitions
def master_fragments(module: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """(name, fp32 fragment) per trainable parameter under ZeRO-1/2 in bf16/fp16 (:func:`master_fragment`, an
    empty tensor where no element lives on this rank): the tensors the EMA follows."""
    out = []
    for n, p in module.named_parameters():
        if not p.requires_grad:
            continue
        got = master_fragment(p, n)
        frag = got[0] if got is not None else torch.empty(0, dtype=torch.float32, device=p.device)
        out.append((n, frag))  # (fragment numel,) fp32, a view of the master partition
    return out


def zero3_local_params(module: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """(name, this rank's fp32 partition) per trainable parameter under ZeRO-3."""
    from deepspeed.utils import safe_get_local_fp32_param

    return [(n, safe_get_local_fp32_param(p)) for n, p in module.named_parameters() if p.requires_grad]


def gather_master_fragments(module: nn.Module, ema_state: dict, group) -> dict:
    """Full CPU fp32 tensors from per-rank fragments laid out as :func:`master_fragments`; collective over the
    data-parallel ``group``."""
    params = dict(module.named_parameters())
    out = {}
    for k, v in ema_state.items():
        p = params[k]
        # Disjoint fragments: every element is written by exactly one rank, so the sum is exact.
        buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        got = master_fragment(p, k)
        if got is not None:
            frag, start = got
            if v.numel() != frag.numel():
                raise RuntimeError(f"EMA of {k!r} holds {v.numel()} elements, this rank's fp32 master fragment "
                                   f"{frag.numel()}: the EMA does not match the ZeRO partitioning")
            buf.narrow(0, start, frag.numel()).copy_(v.detach().float().reshape(-1))
        dist.all_reduce(buf, group=group)
        out[k] = buf.view(p.shape).cpu()
    return out


def gather_zero3(module: nn.Module, ema_state: dict, group) -> dict:
    """Full CPU fp32 tensors from per-rank ZeRO-3 partitions laid out as :func:`zero3_local_params`; collective
    over the data-parallel ``group``."""
    params = dict(module.named_parameters())
    world = dist.get_world_size(group)
    out = {}
    for k, v in ema_state.items():
        part, numel, shape = zero3_partition(params[k])
        local = v.detach().float().reshape(-1)
        buf = torch.zeros(part, dtype=torch.float32, device=local.device)
        buf[: local.numel()] = local
        chunks = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(chunks, buf, group=group)
        out[k] = torch.cat(chunks)[:numel].view(shape).cpu()
    return out


# ---------------------------------------------------------------- checkpoints
def safe_globals() -> list:
    """The DeepSpeed records its optimizer-state files pickle (plain data: no code runs to rebuild them)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def make_reads_safe(ds_engine) -> None:
    """DeepSpeed reads its files with ``torch.load(weights_only=False)``: route the reads of the engine's checkpoint
    engine (``DeepSpeedEngine.checkpoint_engine``) through :func:`~usp_scale.checkpoint.safe_load.torch_load`,
    allowing only the plain DeepSpeed records of :func:`safe_globals`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = getattr(ds_engine, "checkpoint_engine", None)
    if not isinstance(ce, TorchCheckpointEngine):
        raise ConfigError(f"DeepSpeed checkpoint engine {type(ce).__name__}: usp_scale resumes only through "
                          "DeepSpeed's torch checkpoint engine, whose reads it can make safe (weights_only); "
                          "remove the checkpoint-engine settings from the DeepSpeed JSON")
    extra = safe_globals()
    ce.load = lambda p, map_location=None: torch_load(p, what="DeepSpeed checkpoint file", extra_globals=extra,
                                                        map_location=map_location)


def _ema_file(path: str, ema_layout: str) -> str:
    return os.path.join(path, f"ema_rank{D.get_rank():05d}.pt" if ema_layout == "per_rank" else "ema.pt")


def save(ds_engine, path: str, ema_state: Optional[dict], ema_layout: str) -> None:
    """DeepSpeed's checkpoint (tag :data:`TAG`) under ``path``, plus the EMA: ``ema.pt`` (replicated, rank 0) or
    ``ema_rank%05d.pt`` (per rank), and DeepSpeed's ``latest`` file naming the tag, so that DeepSpeed's own tools
    find it without ``--tag`` (``python path/zero_to_fp32.py path OUT``, docs/training.md). Collective."""
    os.makedirs(path, exist_ok=True)
    # save_latest=False: DeepSpeed writes ``latest`` in place; ours is written atomically (usp_scale.fileio) after
    # the tag's files, as DeepSpeed orders them
    ds_engine.save_checkpoint(path, tag=TAG, save_latest=False)
    if D.get_rank() == 0:
        write_text(os.path.join(path, LATEST), TAG)
    if ema_state is not None:
        ema = {k: v.detach().cpu() for k, v in ema_state.items()}
        if ema_layout == "per_rank" or D.get_rank() == 0:
            torch_save(ema, _ema_file(path, ema_layout))
    D.barrier()


def load(ds_engine, path: str, ema_state: Optional[dict], ema_layout: str, what: str) -> None:
    """Load what :func:`save` wrote (model, optimizer, EMA copied into ``ema_state`` in place), reading only plain
    data. ``what`` names this run's ZeRO stage and precision in the errors. Collective."""
    make_reads_safe(ds_engine)
    load_path, _ = ds_engine.load_checkpoint(path, tag=TAG, load_module_strict=True, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
    if load_path is None:
        raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint (tag '{TAG}') found")
    if ema_state is None:
        return
    f = _ema_file(path, ema_layout)
    if not os.path.isfile(f):
        other = "ema.pt" if ema_layout == "per_rank" else "ema_rank*.pt"
        raise FileNotFoundError(
            f"{f}: no EMA for this rank; this run keeps a {ema_layout} EMA ({what}). A checkpoint with {other} was "
            "written with another ZeRO stage or precision: resume with the engine.zero_stage / engine.precision it "
            "was saved with")
    saved = torch_load(f, what="EMA state")
    for k, v in ema_state.items():
        if k not in saved or saved[k].shape != v.shape:
            got = tuple(saved[k].shape) if k in saved else "missing"
            raise ValueError(f"{f}: EMA tensor {k!r} is {got}, this rank expects {tuple(v.shape)}; the checkpoint "
                             "was written with another world size, ZeRO stage or precision")
        v.copy_(saved[k])


# ---------------------------------------------------------------- full (gathered) state
def full_model_state_dict(module: nn.Module, zero_stage: int, frozen_fp32: Optional[dict] = None) -> dict:
    """fp32 master weights (gathered from the ZeRO partitions) plus frozen parameters and buffers, on CPU;
    collective. ``frozen_fp32``: the fp32 values of frozen parameters and float buffers from before DeepSpeed cast
    the module to bf16/fp16; each is used where the module's tensor still equals it cast (it has no master, and the
    cast would otherwise round it in every export), the module's tensor where training changed it."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for n, p in module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            if zero_stage == 3:  # a frozen ZeRO-3 parameter: gather the module weight itself
                with deepspeed.zero.GatheredParameters([p]):
                    full = p.detach().clone()
            else:
                full = p.detach()
        out[n] = full.float().cpu()
    for n, b in module.named_buffers():
        out[n] = b.detach().cpu()
    if frozen_fp32:
        dtypes = {n: t.dtype for n, t in [*module.named_parameters(), *module.named_buffers()]}
        for n, keep in frozen_fp32.items():
            cur, dt = out.get(n), dtypes.get(n)
            if cur is not None and dt not in (None, torch.float32) and torch.equal(keep.to(dt).to(cur.dtype), cur):
                out[n] = keep.clone()
    return out


def full_optimizer_state_dict(module: nn.Module, client_optimizer: torch.optim.Optimizer, group_names: list,
                              zero_optimizer, zero_stage: int) -> Optional[dict]:
    """The optimizer state in torch's own format, as ``client_optimizer.state_dict()`` (e.g. torch.optim.AdamW)
    over the unwrapped model's param groups would give it: {"state": {index: {"step", "exp_avg", "exp_avg_sq",
    ...}}, "param_groups": [{hyper-parameters..., "params": [index, ...]}]}, indices running over the groups'
    parameters (``group_names``: the parameter names of each group, in order). Per-element states are fp32 tensors
    of the parameter's shape, gathered from the ZeRO-1/2/3 partitions (``safe_get_full_optimizer_state``); scalar
    states such as "step" are the same for every partition. Collective; the dict on rank 0, None elsewhere."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if zero_stage in (1, 2):
        link_optimizer_states(zero_optimizer)
    sample = next(iter(client_optimizer.state.values()), {})  # one flat partition's state (all alike); {} before
    per_elem = sorted(k for k, v in sample.items() if torch.is_tensor(v) and v.dim() > 0)
    scalar = {k: (v.detach().clone().cpu() if torch.is_tensor(v) else v) for k, v in sample.items()
              if k not in per_elem}
    params = dict(module.named_parameters())
    main = D.get_rank() == 0
    state, groups, index = {}, [], 0
    for names, group in zip(group_names, client_optimizer.param_groups):
        ids = []
        for n in names:
            p = params[n]
            entry = dict(scalar) if sample else None
            for k in per_elem:
                full = safe_get_full_optimizer_state(p, k)  # collective
                if full is None:
                    raise RuntimeError(f"deepspeed ZeRO-{zero_stage}: no optimizer state {k!r} linked to "
                                       f"parameter {n!r}; cannot export a full optimizer state")
                if main:
                    shape = zero3_partition(p)[2] if zero_stage == 3 else p.shape
                    entry[k] = full.detach().float().cpu().reshape(shape)
            if main and entry is not None:
                state[index] = entry
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups} if main else None


# ---------------------------------------------------------------- the engine's two parts
class ZeroWeights(Weights):
    """EMA layout (:attr:`layout`): "replicated" (fp32, or ZeRO-1/2 fp32 where module weights equal the masters),
    "per_rank" under ZeRO-3 (this rank's fp32 partitions) and under ZeRO-1/2 in bf16/fp16 (this rank's fragments of
    the fp32 masters, ``ema_from_masters``), so the EMA always averages fp32 weights. ``ds_engine`` is DeepSpeed's
    engine, ``client_optimizer`` the torch optimizer it wraps, ``group_names`` the parameter names of each of its
    groups."""

    def __init__(self, ds_engine, client_optimizer, *, zero_stage: int, ema_from_masters: bool, group_names: list,
                 frozen_fp32: Optional[dict] = None):
        super().__init__(ds_engine.module, client_optimizer)
        self.frozen_fp32 = frozen_fp32 or {}
        self.ds_engine, self.zero_stage, self.ema_from_masters = ds_engine, zero_stage, ema_from_masters
        self.group_names = group_names
        self.layout = "per_rank" if zero_stage == 3 or ema_from_masters else "replicated"

    @property
    def dp_group(self):
        """The process group DeepSpeed partitions ZeRO state over (the data-parallel group; all ranks here)."""
        return self.ds_engine.seq_data_parallel_group

    def ema_sources(self):
        if self.ema_from_masters:
            return master_fragments(self.module)
        if self.zero_stage == 3:
            return zero3_local_params(self.module)
        return super().ema_sources()

    def gather_ema(self, ema_state: dict) -> dict:
        if self.ema_from_masters:
            return gather_master_fragments(self.module, ema_state, self.dp_group)
        if self.zero_stage == 3:
            return gather_zero3(self.module, ema_state, self.dp_group)
        return super().gather_ema(ema_state)

    def full_model_state_dict(self) -> dict:
        return full_model_state_dict(self.module, self.zero_stage, self.frozen_fp32)

    def full_optimizer_state_dict(self) -> Optional[dict]:
        return full_optimizer_state_dict(self.module, self.optimizer, self.group_names, self.ds_engine.optimizer,
                                         self.zero_stage)


class DeepSpeedState:
    """Checkpoint I/O in DeepSpeed's own layout (same engine and world size to resume; :func:`save` /
    :func:`load`); ``config`` is the merged DeepSpeed JSON the run used (recorded in the checkpoint's meta.json),
    ``what`` names this run's ZeRO stage and precision in errors."""

    format = "deepspeed"

    def __init__(self, ds_engine, config: dict, ema_layout: str, what: str):
        self.model, self.config, self.ema_layout, self.what = ds_engine, config, ema_layout, what

    def state_dict(self) -> dict:
        raise NotImplementedError("DeepSpeed state is saved with save(dir); use weights.full_model_state_dict() for "
                                  "the weights")

    def save(self, path: str, ema_state: Optional[dict] = None) -> None:
        save(self.model, path, ema_state, self.ema_layout)

    def load(self, path: str, ema_state: Optional[dict] = None) -> None:
        load(self.model, path, ema_state, self.ema_layout, what=self.what)
