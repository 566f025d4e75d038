"""DeepSpeed ZeRO-1/2/3 engine with its JSON config generated from ours.

A user-supplied ``--deepspeed_config`` JSON is merged over the generated config. Keys that our
config owns (batch sizes, accumulation, ZeRO stage, precision, clipping, optimizer, scheduler)
must either be absent, ``"auto"``, or equal to our value; anything else is a :class:`ConfigError`
that lists every conflicting key and where to set it instead.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Optional

import torch
import torch.nn as nn

from ..checkpoint.safe_load import torch_load, torch_save
from ..config import ConfigError
from . import dist as D
from .base import Engine, poison_nonfinite

# Generated key -> the usp_scale config key that sets it.
OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "schedule.accum_iter",
    "train_batch_size": "data.batch_size x schedule.accum_iter x world size",
    "zero_optimization.stage": "engine.zero_stage",
    "bf16.enabled": "engine.precision",
    "fp16.enabled": "engine.precision",
    "gradient_clipping": "optim.clip_grad",
    "communication_data_type": "engine.reduce_dtype",
}
FORBIDDEN_KEYS = {"optimizer": "optim.*", "scheduler": "schedule.*"}


def _ds_safe_globals() -> list:
    """The DeepSpeed records its optimizer-state files pickle (plain data: no code runs to rebuild them)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def generate_config(*, micro_batch: int, accum_iter: int, world_size: int, zero_stage: int,
                    precision: str, clip_grad: float, reduce_dtype: str = "fp32") -> dict:
    """DeepSpeed JSON config from our settings."""
    if zero_stage not in (1, 2, 3):
        raise ConfigError(f"engine.zero_stage={zero_stage}: DeepSpeed ZeRO stage must be 1, 2 or 3")
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("engine.precision=fp16 is not supported by DeepSpeed on CPU; use bf16 or fp32")
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_iter,
        "train_batch_size": micro_batch * accum_iter * world_size,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "gradient_clipping": float(clip_grad),
        # Gradient reduction dtype (DeepSpeed's default is the model dtype, i.e. bf16/fp16 under mixed precision).
        "communication_data_type": reduce_dtype,
        # Our optimizer is torch's AdamW / LARS, built by usp_scale.training.optim.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _set(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def merge_user_config(generated: dict, user: dict, source: str = "--deepspeed_config") -> dict:
    """Merge ``user`` over ``generated``; raise on conflicts with the keys we own."""
    conflicts = []
    for key, where in FORBIDDEN_KEYS.items():
        if key in user:
            conflicts.append(f"  '{key}': usp_scale builds it from {where}; remove it from {source}")
    flat_gen, flat_user = _flatten(generated), _flatten(user)
    for key, where in OWNED_KEYS.items():
        if key in flat_user and flat_user[key] != "auto" and flat_user[key] != flat_gen.get(key):
            conflicts.append(f"  '{key}': ours={flat_gen.get(key)!r}, {source}={flat_user[key]!r} "
                             f"(set {where} instead, or remove the key / use \"auto\")")
    if conflicts:
        raise ConfigError(f"{source} conflicts with the usp_scale config:\n" + "\n".join(conflicts))
    merged = copy.deepcopy(generated)
    for key, value in flat_user.items():
        if value == "auto":
            continue
        _set(merged, key, value)
    return merged


def load_user_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"engine.deepspeed_config: file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object, got {type(obj).__name__}")
    return obj


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` over our model and optimizer; DeepSpeed does accumulation and clipping."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, optimizer_factory, *, zero_stage: int = 2, micro_batch: int = 1,
                 user_config: str = "", reduce_dtype: str = "fp32", **kw):
        super().__init__(model, **kw)
        import deepspeed

        self.scaler = None  # DeepSpeed owns loss scaling
        cfg = generate_config(micro_batch=micro_batch, accum_iter=self.accum_iter, world_size=D.get_world_size(),
                              zero_stage=zero_stage, precision=self.precision, clip_grad=self.clip_grad,
                              reduce_dtype=reduce_dtype)
        if user_config:
            cfg = merge_user_config(cfg, load_user_config(user_config), user_config)
        self.ds_config = cfg
        self.zero_stage = cfg["zero_optimization"]["stage"]
        # ZeRO-1/2 in bf16/fp16: the EMA follows this rank's slice of the fp32 master partition, not the
        # low-precision module weights (fp32 ZeRO-1/2 module weights equal the masters, so they stay replicated).
        bit16 = bool(cfg.get("bf16", {}).get("enabled")) or bool(cfg.get("fp16", {}).get("enabled"))
        self.ema_from_masters = self.zero_stage in (1, 2) and bit16
        if self.zero_stage == 3 or self.ema_from_masters:
            self.ema_layout = "per_rank"
        optimizer = optimizer_factory(model)
        # Parameter names of each param group, in the optimizer's order (DeepSpeed replaces the groups' params
        # by flat partitions): the index layout of a torch optimizer state dict over the same groups.
        names = {id(p): n for n, p in model.named_parameters()}
        self._group_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        self._client_optimizer = optimizer
        # In bf16/fp16 DeepSpeed casts the module first and builds its fp32 masters from the cast weights, which
        # would drop the low bits of fp32 weights (a transferred checkpoint, the fp32 init). Keep them (on the
        # host) and write them back into the masters.
        fp32 = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters()
                if p.requires_grad and p.dtype == torch.float32} if bit16 else {}
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
        self.unwrapped = self.model.module
        if fp32:
            from deepspeed.utils import safe_set_full_fp32_param

            for n, p in self.unwrapped.named_parameters():
                if n in fp32:
                    safe_set_full_fp32_param(p, fp32[n].to(self.device))

    def autocast(self):
        # bf16 DeepSpeed holds bf16 module weights; autocast casts fp32 inputs to match.
        return super().autocast()

    def backward(self, loss):
        self.model.backward(poison_nonfinite(loss))

    def step(self):
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.step()
        self.micro_step = (self.micro_step + 1) % self.accum_iter
        if not boundary:
            return None
        norm = self.model.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        applied = bool(self.model.was_step_applied())
        if norm != norm or norm in (float("inf"), float("-inf")):
            applied = False
        from .base import StepResult

        return StepResult.from_host(applied, norm, device=self.device)

    def zero_grad(self):
        self.model.zero_grad()

    @property
    def param_groups(self):
        return self._client_optimizer.param_groups

    # ---------------------------------------------------------------- EMA
    def ema_sources(self):
        if self.ema_from_masters:
            return self._master_fragments()
        if self.zero_stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param

            out = []
            for n, p in self.unwrapped.named_parameters():
                if p.requires_grad:
                    out.append((n, safe_get_local_fp32_param(p)))
            return out
        return super().ema_sources()

    def _master_fragments(self):
        """(name, fp32 tensor) per trainable parameter under ZeRO-1/2 with bf16/fp16 weights: the 1-D view of
        DeepSpeed's fp32 master partition (``single_partition_of_fp32_groups`` / the bf16 optimizer's fp32
        groups) that holds this rank's part of the parameter, linked through ``param._hp_mapping``; an empty
        tensor where no element of the parameter lives on this rank."""
        out = []
        for n, p in self.unwrapped.named_parameters():
            if not p.requires_grad:
                continue
            if not hasattr(p, "get_full_hp_param"):
                raise RuntimeError(f"deepspeed ZeRO-{self.zero_stage}: parameter {n!r} has no fp32 master linked by "
                                   "DeepSpeed (is it missing from the optimizer's param groups?)")
            m = p._hp_mapping
            frag = m.get_hp_fragment() if m is not None else None
            if frag is None:
                frag = torch.empty(0, dtype=torch.float32, device=p.device)
            out.append((n, frag))  # (fragment numel,) fp32, a view of the master partition
        return out

    def _gather_master_fragments(self, ema_state: dict) -> dict:
        import torch.distributed as dist

        params = dict(self.unwrapped.named_parameters())
        out = {}
        for k, v in ema_state.items():
            p = params[k]
            # Disjoint fragments: every element is written by exactly one rank, so the sum is exact.
            buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            m = p._hp_mapping
            if m is not None:
                a = m.lp_fragment_address
                if v.numel() != a.numel:
                    raise RuntimeError(f"EMA of {k!r} holds {v.numel()} elements, this rank's fp32 master fragment "
                                       f"{a.numel}: the EMA does not match the ZeRO partitioning")
                buf.narrow(0, a.start, a.numel).copy_(v.detach().float().reshape(-1))
            dist.all_reduce(buf, group=getattr(p, "_dp_group", None))
            out[k] = buf.view(p.shape).cpu()
        return out

    def gather_ema(self, ema_state: dict) -> dict:
        if self.ema_from_masters:
            return self._gather_master_fragments(ema_state)
        if self.zero_stage != 3:
            return super().gather_ema(ema_state)
        import torch.distributed as dist

        params = dict(self.unwrapped.named_parameters())
        out = {}
        world = D.get_world_size()
        for k, v in ema_state.items():
            p = params[k]
            local = v.detach().float().reshape(-1)
            part = p.ds_tensor.numel()  # padded partition size, same on every rank
            buf = torch.zeros(part, dtype=torch.float32, device=local.device)
            buf[: local.numel()] = local
            chunks = [torch.empty_like(buf) for _ in range(world)]
            dist.all_gather(chunks, buf)
            out[k] = torch.cat(chunks)[: p.ds_numel].view(p.ds_shape).cpu()
        return out

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        raise NotImplementedError("DeepSpeed state is saved with save(dir); use full_model_state_dict() for weights")

    def save(self, path: str, ema_state: Optional[dict] = None) -> None:
        os.makedirs(path, exist_ok=True)
        self.model.save_checkpoint(path, tag="ds", save_latest=False)
        if ema_state is not None:
            ema = {k: v.detach().cpu() for k, v in ema_state.items()}
            if self.ema_layout == "per_rank":
                torch_save(ema, os.path.join(path, f"ema_rank{D.get_rank():05d}.pt"))
            elif D.get_rank() == 0:
                torch_save(ema, os.path.join(path, "ema.pt"))
        D.barrier()

    def _safe_checkpoint_reads(self) -> None:
        """DeepSpeed reads its files with ``torch.load(weights_only=False)``: route its checkpoint engine's reads
        through :func:`~usp_scale.checkpoint.safe_load.torch_load`, allowing only the plain DeepSpeed records its
        optimizer files hold (loss scaler, ZeRO stage enum, fragment addresses)."""
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        from ..checkpoint.safe_load import torch_load

        ce = getattr(self.model, "checkpoint_engine", None)
        if not isinstance(ce, TorchCheckpointEngine):
            raise ConfigError(f"DeepSpeed checkpoint engine {type(ce).__name__}: usp_scale resumes only through "
                              "DeepSpeed's torch checkpoint engine, whose reads it can make safe (weights_only); "
                              "remove the checkpoint-engine settings from the DeepSpeed JSON")
        ce.load = lambda p, map_location=None: torch_load(p, what="DeepSpeed checkpoint file",
                                                            extra_globals=_ds_safe_globals(), map_location=map_location)

    def load(self, path: str, ema_state: Optional[dict] = None) -> None:
        self._safe_checkpoint_reads()
        load_path, _ = self.model.load_checkpoint(path, tag="ds", load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint (tag 'ds') found")
        if ema_state is not None:
            name = f"ema_rank{D.get_rank():05d}.pt" if self.ema_layout == "per_rank" else "ema.pt"
            f = os.path.join(path, name)
            if not os.path.isfile(f):
                other = "ema.pt" if self.ema_layout == "per_rank" else "ema_rank*.pt"
                raise FileNotFoundError(
                    f"{f}: no EMA for this rank; this run keeps a {self.ema_layout} EMA (ZeRO-{self.zero_stage}, "
                    f"{self.precision}). A checkpoint with {other} was written with another ZeRO stage or precision: "
                    "resume with the engine.zero_stage / engine.precision it was saved with")
            saved = torch_load(f, what="EMA state")
            for k, v in ema_state.items():
                if k not in saved or saved[k].shape != v.shape:
                    got = tuple(saved[k].shape) if k in saved else "missing"
                    raise ValueError(f"{f}: EMA tensor {k!r} is {got}, this rank expects {tuple(v.shape)}; the "
                                     "checkpoint was written with another world size, ZeRO stage or precision")
                v.copy_(saved[k])

    def full_model_state_dict(self) -> dict:
        """fp32 master weights (gathered from the ZeRO partitions) plus buffers; collective."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for n, p in self.unwrapped.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:
                if self.zero_stage == 3:
                    import deepspeed

                    with deepspeed.zero.GatheredParameters([p]):
                        full = p.detach().clone()
                else:
                    full = p.detach()
            out[n] = full.float().cpu()
        for n, b in self.unwrapped.named_buffers():
            out[n] = b.detach().cpu()
        return out

    def _link_optimizer_states(self) -> None:
        """ZeRO-1/2: (re)link every parameter to its fragment of the optimizer state. DeepSpeed links them once,
        right after the optimizer step of the first param group, when the later groups have no state yet, so the
        parameters of group 2 onward (e.g. the no-weight-decay group) are left without optimizer state
        (``safe_get_full_optimizer_state`` raises "exp_avg not found in optimizer state fragment")."""
        if self.zero_stage not in (1, 2):
            return
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        zopt = self.model.optimizer
        inner = getattr(zopt, "optimizer", None)
        lps = getattr(zopt, "bit16_groups", None) or getattr(zopt, "bf16_groups", None)
        flats = getattr(zopt, "single_partition_of_fp32_groups", None) or \
            getattr(zopt, "fp32_groups_flat_partition", None)
        if inner is None or lps is None or flats is None:
            raise RuntimeError(f"deepspeed ZeRO-{self.zero_stage}: unknown optimizer wrapper {type(zopt).__name__} "
                               "(no bit16 groups / fp32 partitions); cannot export its optimizer state")
        for lp, flat in zip(lps, flats):
            if len(inner.state.get(flat, {})):
                lazy_init_hp_params_optimizer_state(lp, flat, inner.state)

    def full_optimizer_state_dict(self) -> Optional[dict]:
        """The optimizer state in torch's own format, as ``optimizer.state_dict()`` of the client optimizer (e.g.
        torch.optim.AdamW) over the unwrapped model's param groups would give it: {"state": {index: {"step",
        "exp_avg", "exp_avg_sq", ...}}, "param_groups": [{hyper-parameters..., "params": [index, ...]}]}, indices
        running over the groups' parameters in order. Per-element states are fp32 tensors of the parameter's
        shape, gathered from the ZeRO-1/2/3 partitions (``safe_get_full_optimizer_state``); scalar states such as
        "step" are the same for every partition. Collective; the dict on rank 0, None on other ranks."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self._link_optimizer_states()
        client = self._client_optimizer
        sample = next(iter(client.state.values()), {})  # one flat partition's state (all alike); {} before a step
        per_elem = sorted(k for k, v in sample.items() if torch.is_tensor(v) and v.dim() > 0)
        scalar = {k: (v.detach().clone().cpu() if torch.is_tensor(v) else v) for k, v in sample.items()
                  if k not in per_elem}
        params = dict(self.unwrapped.named_parameters())
        main = D.get_rank() == 0
        state, groups, index = {}, [], 0
        for names, group in zip(self._group_names, client.param_groups):
            ids = []
            for n in names:
                entry = dict(scalar) if sample else None
                for k in per_elem:
                    full = safe_get_full_optimizer_state(params[n], k)  # collective
                    if full is None:
                        raise RuntimeError(f"deepspeed ZeRO-{self.zero_stage}: no optimizer state {k!r} linked to "
                                           f"parameter {n!r}; cannot export a full optimizer state")
                    if main:
                        entry[k] = full.detach().float().cpu().reshape(params[n].ds_shape if hasattr(
                            params[n], "ds_shape") else params[n].shape)
                if main and entry is not None:
                    state[index] = entry
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups} if main else None
