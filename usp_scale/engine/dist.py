"""Process-group setup from whatever launcher started us.

Reads the environment of ``python`` (one process), ``torchrun`` (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT), the ``deepspeed`` launcher (the same variables, plus ``--local_rank`` on the
command line) and SLURM's ``srun`` (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, the first host of
SLURM_JOB_NODELIST as master). Backend: nccl on GPU, gloo on CPU, unless forced.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .hosts import expand_slurm_nodelist  # noqa: F401  (re-exported)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    # "python", "torchrun", "deepspeed", "slurm"
    launcher: str = "python"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(env: Optional[dict] = None, local_rank_arg: Optional[int] = None) -> DistInfo:
    """Work out rank / world size / master from the environment (does not initialise anything)."""
    env = dict(os.environ if env is None else env)
    info = DistInfo()
    if "RANK" in env and "WORLD_SIZE" in env:
        info.rank = int(env["RANK"])
        info.world_size = int(env["WORLD_SIZE"])
        info.local_rank = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
        info.local_world_size = int(env.get("LOCAL_WORLD_SIZE", info.world_size))
        info.launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env else "deepspeed"
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        # One srun task per process (srun --ntasks-per-node=GPUS python launchers/pretrain.py).
        info.rank = int(env["SLURM_PROCID"])
        info.world_size = int(env["SLURM_NTASKS"])
        info.local_rank = int(env.get("SLURM_LOCALID", 0))
        info.local_world_size = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        info.launcher = "slurm"
        if "MASTER_ADDR" not in env:
            nodes = expand_slurm_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
            env["MASTER_ADDR"] = nodes[0]
        if "MASTER_PORT" not in env:
            env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "9500")) % 20000)
    elif local_rank_arg is not None and local_rank_arg >= 0:
        info.local_rank = local_rank_arg
    info.master_addr = env.get("MASTER_ADDR", "127.0.0.1")
    info.master_port = int(env.get("MASTER_PORT", "29500"))
    return info


_INFO: Optional[DistInfo] = None


def init_distributed(backend: str = "auto", timeout_min: int = 30,
                     local_rank_arg: Optional[int] = None) -> DistInfo:
    """Initialise the default process group (once) and return this process's :class:`DistInfo`.

    A single process (world size 1) gets no process group unless one already exists.
    """
    global _INFO
    info = detect(local_rank_arg=local_rank_arg)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"engine.backend={backend!r}: use 'auto', 'nccl' or 'gloo'")
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % max(torch.cuda.device_count(), 1))
    if info.distributed and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", info.master_addr)
        os.environ.setdefault("MASTER_PORT", str(info.master_port))
        kwargs = dict(backend=backend, rank=info.rank, world_size=info.world_size,
                      timeout=datetime.timedelta(minutes=timeout_min))
        if backend == "nccl":
            kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(init_method=f"tcp://{info.master_addr}:{info.master_port}"
                                if info.launcher == "slurm" else "env://", **kwargs)
    _INFO = info
    return info


def device_for(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_max(x: float) -> float:
    if get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj, src: int = 0):
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
