"""FSDP2 engine: ``fully_shard`` per transformer block, then the root; checkpoints through the base class's DCP path."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import runtime as D
from .base import Engine, block_lists


def hsdp_mesh(shard_size: int, device: torch.device):
    """None (shard over all ranks) or, for ``0 < shard_size < world``, a 2-D mesh ("replicate", "shard"): parameters
    sharded within groups of ``shard_size`` consecutive ranks (a node) and replicated across groups (HSDP), so the
    all-gathers stay on the fast intra-node links and only the gradient all-reduce crosses nodes."""
    world = D.get_world_size()
    if shard_size <= 0 or shard_size == world:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


class FSDP2Engine(Engine):
    """Parameters become DTensors sharded over all ranks, or with ``shard_size`` within groups of that many ranks
    and replicated across them (HSDP, :func:`hsdp_mesh`).

    ``reshard_after_forward=False`` keeps gathered parameters between forward and backward
    (ZeRO-2-like: more memory, one all-gather fewer). Mixed precision: parameters are gathered in
    bf16/fp16 when asked, gradients are reduce-scattered in ``reduce_dtype`` (fp32 by default, torchtitan's
    default; "bf16" halves the bytes). fp16 uses the base class's torch.amp.GradScaler
    unchanged: DTensor's handler of ``_amp_foreach_non_finite_check_and_unscale_`` all-reduces found_inf
    over the mesh, so an overflow in one rank's shard skips the step and backs off the scale on every rank
    (tests/test_train_fp16.py).
    """

    name = "fsdp2"
    ema_layout = "dtensor"

    def __init__(self, model: nn.Module, optimizer_factory, *, reshard_after_forward: bool = True,
                 shard_size: int = 0, reduce_dtype: str = "fp32", **kw):
        super().__init__(model, **kw)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.reduce_dtype = reduce_dtype
        mp = MixedPrecisionPolicy(param_dtype=param_dtype,
                                  reduce_dtype=torch.bfloat16 if reduce_dtype == "bf16" else torch.float32)
        self.mesh = hsdp_mesh(shard_size, self.device)
        for block in block_lists(model):
            fully_shard(block, mesh=self.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=self.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        self.model = model
        self.optimizer = optimizer_factory(model)

    def backward(self, loss):
        # Reduce-scatter gradients only on the accumulation boundary.
        self.model.set_requires_gradient_sync(self.is_boundary())
        super().backward(loss)

    # ---------------------------------------------------------------- EMA
    def gather_ema(self, ema_state: dict) -> dict:
        out = {}
        for k, v in ema_state.items():
            full = v.full_tensor() if hasattr(v, "full_tensor") else v
            out[k] = full.detach().float().cpu()
        return out

    def full_model_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}

    def full_optimizer_state_dict(self) -> Optional[dict]:
        """Full optimizer state in torch's index-keyed format (as ``optimizer.state_dict()`` of the unwrapped model
        over the same param groups gives it, e.g. the official DiT checkpoint's "opt"): DCP's full state dict is
        keyed by parameter names, renumbered here in param-group order. Collective; complete on rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.model, self.optimizer,
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
