"""FSDP2 engine: ``fully_shard`` per transformer block, then the root; the model may be built on the meta device and
is then initialised after sharding; checkpoints through DCP (:class:`usp_scale.checkpoint.dcp.DCPState`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .. import runtime as D
from ..checkpoint.dcp import DCPState
from .base import Engine, Weights, block_lists


def hsdp_mesh(shard_size: int, device: torch.device):
    """None (shard over all ranks) or, for ``0 < shard_size < world``, a 2-D mesh ("replicate", "shard"): parameters
    sharded within groups of ``shard_size`` consecutive ranks (a node) and replicated across groups (HSDP), so the
    all-gathers stay on the fast intra-node links and only the gradient all-reduce crosses nodes. ``shard_size``
    divides the world size (a rule of the config, checked at start-up)."""
    world = D.get_world_size()
    if shard_size <= 0 or shard_size == world:
        return None
    return init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def is_meta(model: nn.Module) -> bool:
    """True when ``model`` was built on the meta device (no memory: initialised after sharding)."""
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def materialize_after_sharding(model: nn.Module, init_state: Optional[dict], device: torch.device) -> None:
    """Allocate the shards of ``model`` (sharded on the meta device) and fill them from ``init_state``, the full state
    dict of the same model on rank 0 (ignored elsewhere): one transformer block at a time, one broadcast from rank 0
    per tensor, every rank keeping its own shard of it. Rank 0 drops each full tensor once its shards are filled, so
    no rank ever holds more than the whole model once (rank 0, at the start) plus one block's shards; the weights
    are exactly those of the model built whole. Collective."""
    rank0 = D.get_rank() == 0
    state = init_state if rank0 else None
    blocks = [(f"{attr}.{i}.", b) for attr in ("blocks", "decoder_blocks") for i, b in enumerate(getattr(model, attr, ()))]
    in_block = {id(m) for _, b in blocks for m in b.modules()}

    def fill(prefix: str, tensors) -> None:
        for name, t in tensors:
            key = prefix + name
            if rank0 and key not in state:
                raise KeyError(f"initialising after sharding: the state of rank 0's model has no {key!r}")
            full = state.pop(key).to(device=device, dtype=t.dtype).contiguous() if rank0 else \
                torch.empty(t.shape, dtype=t.dtype, device=device)
            dist.broadcast(full, src=0)
            if isinstance(t, DTensor):
                t.to_local().copy_(distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local())
            else:
                t.copy_(full)

    for prefix, block in blocks:
        block.to_empty(device=device)
        fill(prefix, list(block.named_parameters()) + list(block.named_buffers()))
    for name, m in model.named_modules():
        if id(m) in in_block:
            continue
        m.to_empty(device=device, recurse=False)
        prefix = f"{name}." if name else ""
        fill(prefix, list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)))


class ShardedWeights(Weights):
    """FSDP2's layout: the EMA follows the DTensor shards; full tensors are gathered (collectives)."""

    layout = "dtensor"

    def gather_ema(self, ema_state: dict) -> dict:
        out = {}
        for k, v in ema_state.items():
            full = v.full_tensor() if hasattr(v, "full_tensor") else v
            out[k] = full.detach().float().cpu()
        return out

    def full_model_state_dict(self) -> dict:
        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}

    def full_optimizer_state_dict(self) -> Optional[dict]:
        """Full optimizer state in torch's index-keyed format (as ``optimizer.state_dict()`` of the unwrapped model
        over the same param groups gives it, e.g. the official DiT checkpoint's "opt"): DCP's full state dict is
        keyed by parameter names, renumbered here in param-group order. Collective; complete on rank 0."""
        osd = get_optimizer_state_dict(self.module, self.optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not osd.get("param_groups"):  # ranks other than 0 get nothing with cpu_offload
            return osd
        index, groups = {}, []
        for g in osd["param_groups"]:
            ids = []
            for fqn in g["params"]:
                index[fqn] = len(index)
                ids.append(index[fqn])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
        return {"state": {index[k]: v for k, v in osd["state"].items()}, "param_groups": groups}


class FSDP2Engine(Engine):
    """Parameters become DTensors sharded over all ranks, or with ``shard_size`` within groups of that many ranks
    and replicated across them (HSDP, :func:`hsdp_mesh`).

    A model built on the meta device (:func:`is_meta`) is materialised after sharding
    (:func:`materialize_after_sharding`): each rank allocates only its shards, which ``init_state`` (the full state
    dict of the same model built and initialised on rank 0; ignored elsewhere) fills through a per-tensor broadcast
    from rank 0, so the weights are exactly those of the model built whole while no other rank ever holds the whole
    model.

    ``reshard_after_forward=False`` keeps gathered parameters between forward and backward
    (ZeRO-2-like: more memory, one all-gather fewer). Mixed precision: parameters are gathered in
    bf16/fp16 when asked, gradients are reduce-scattered in ``reduce_dtype`` (fp32 by default, torchtitan's
    default; "bf16" halves the bytes). fp16 uses the base class's torch.amp.GradScaler
    unchanged: DTensor's handler of ``_amp_foreach_non_finite_check_and_unscale_`` all-reduces found_inf
    over the mesh, so an overflow in one rank's shard skips the step and backs off the scale on every rank
    (tests/test_train_fp16.py).
    """

    name = "fsdp2"

    def __init__(self, model: nn.Module, optimizer_factory, *, reshard_after_forward: bool = True,
                 shard_size: int = 0, reduce_dtype: str = "fp32", init_state: Optional[dict] = None, **kw):
        super().__init__(model, **kw)
        param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.reduce_dtype = reduce_dtype
        mp = MixedPrecisionPolicy(param_dtype=param_dtype,
                                  reduce_dtype=torch.bfloat16 if reduce_dtype == "bf16" else torch.float32)
        self.mesh = hsdp_mesh(shard_size, self.device)
        meta = is_meta(model)
        for block in block_lists(model):
            fully_shard(block, mesh=self.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=self.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        if meta:
            materialize_after_sharding(model, init_state, self.device)
        self.model = model
        self.optimizer = optimizer_factory(model)
        self.weights = ShardedWeights(model, self.optimizer)
        self.state = DCPState(self.model, self.optimizer, self.scaler)

    def backward(self, loss):
        # Reduce-scatter gradients only on the accumulation boundary.
        self.model.set_requires_gradient_sync(self._is_boundary())
        super().backward(loss)
