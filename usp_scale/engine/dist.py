"""Process-group setup from whatever launcher started us.

Reads the environment of ``python`` (one process), ``torchrun`` (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT), the ``deepspeed`` launcher (the same variables, plus ``--local_rank`` on the
command line) and SLURM's ``srun`` (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, the first host of
SLURM_JOB_NODELIST as master). Backend: nccl on GPU, gloo on CPU, unless forced.

Under srun (DeepSpeed's ``--launcher slurm`` starts the ranks that way) nothing sets RANK / LOCAL_RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT: :func:`init_distributed` exports them from the SLURM variables, so
``deepspeed.initialize`` and anything else that reads them sees the same ranks.

Two timeouts: ``engine.timeout_min`` (long) covers start-up, the first steps (compilation), checkpoints and
evaluation; once training runs, :func:`use_train_timeout` lowers every process group's timeout to
``engine.train_timeout_s``, so a hung or unreachable peer stops the job in seconds, not half an hour, and
:func:`long_timeout` restores the long one around work that may legitimately keep peers waiting.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..cluster.hosts import expand_slurm_nodelist  # noqa: F401  (re-exported)


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
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE", "1")
        info.local_world_size = tasks_on_node(per_node, int(env.get("SLURM_NODEID", 0)))
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


def shared_rendezvous_store_with_restarts(env=None) -> bool:
    """Under torchrun with restarts allowed and the c10d rendezvous store shared with the workers (torchrun's
    default unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): the store outlives a restart with the old round's keys."""
    env = os.environ if env is None else env
    return int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def tasks_on_node(spec: str, node: int) -> int:
    """Tasks on node ``node`` from a SLURM tasks-per-node list such as ``2(x3),1`` (SLURM_STEP_TASKS_PER_NODE)."""
    counts = []
    for part in spec.split(","):
        n, _, rep = part.partition("(x")
        counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    return counts[min(node, len(counts) - 1)]


def export_env(info: DistInfo) -> None:
    """Publish ``info`` as the torchrun-style variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) for code that reads them, e.g. ``deepspeed.initialize`` under srun. Values a
    launcher already set are kept."""
    for key, val in (("RANK", info.rank), ("LOCAL_RANK", info.local_rank), ("WORLD_SIZE", info.world_size),
                     ("LOCAL_WORLD_SIZE", info.local_world_size), ("MASTER_ADDR", info.master_addr),
                     ("MASTER_PORT", info.master_port)):
        os.environ.setdefault(key, str(val))


_INFO: Optional[DistInfo] = None


def resolve_backend(backend: str) -> str:
    """"auto" -> nccl with CUDA, gloo without; validates the name."""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"engine.backend={backend!r}: use 'auto', 'nccl' or 'gloo'")
    return backend


def init_distributed(backend: str = "auto", timeout_min: int = 30, local_rank_arg: Optional[int] = None,
                     single_process_group: bool = False) -> DistInfo:
    """Initialise the default process group (once) and return this process's :class:`DistInfo`. The one place
    that creates the default process group.

    A single process (world size 1) gets a 1-rank group only with ``single_process_group`` (DDP, FSDP2 and
    DeepSpeed need one even then; the local engine does not), on a free local port.
    """
    global _INFO
    info = detect(local_rank_arg=local_rank_arg)
    backend = resolve_backend(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % max(torch.cuda.device_count(), 1))
    timeout = datetime.timedelta(minutes=timeout_min)
    if dist.is_initialized():
        pass
    elif info.distributed:
        export_env(info)
        if info.rank == 0 and shared_rendezvous_store_with_restarts():
            print("[usp_scale] WARNING: torchrun --max-restarts with its rendezvous store shared with the workers: "
                  "restarted workers can read the previous round's addresses from it and fail to connect (or hang) "
                  "(pytorch/pytorch#135712); start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
                  file=sys.stderr, flush=True)
        _TIMEOUT["init"] = timeout
        kwargs = dict(backend=backend, rank=info.rank, world_size=info.world_size, timeout=timeout)
        if backend == "nccl":
            kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(init_method="env://", **kwargs)
    elif single_process_group:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        # DeepSpeed reads these even for one process started with plain `python`.
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
            os.environ.setdefault(k, v)
        dist.init_process_group(backend, rank=0, world_size=1, timeout=timeout)
    _INFO = info
    return info


# The long (start-up) timeout, and the training timeout once use_train_timeout() switched to it.
_TIMEOUT = {"init": None, "train": None}


def _set_timeout_all(timeout: datetime.timedelta) -> None:
    """Set the timeout of every process group this rank belongs to (the default group, DeviceMesh dimensions,
    DeepSpeed's groups); works for gloo and nccl."""
    from torch.distributed import distributed_c10d as c10d

    set_timeout = getattr(dist, "set_timeout", None) or c10d._set_pg_timeout
    for pg in list(c10d._world.pg_map):
        try:
            set_timeout(timeout, pg)
        except ValueError:  # a group this rank is not part of
            pass


def use_train_timeout(seconds: float) -> bool:
    """Collective: after a barrier under the long timeout (so no rank still in its first step meets the short
    one), lower every process group's timeout to ``seconds``. No-op (False) for one process or ``seconds <= 0``."""
    if get_world_size() == 1 or seconds <= 0 or _TIMEOUT["init"] is None:
        return False
    dist.barrier()
    _TIMEOUT["train"] = datetime.timedelta(seconds=seconds)
    _set_timeout_all(_TIMEOUT["train"])
    return True


def end_train_timeout() -> None:
    """Back to the long timeout for good (after the training loop: exports, final evaluation)."""
    if _TIMEOUT["train"] is not None:
        _TIMEOUT["train"] = None
        _set_timeout_all(_TIMEOUT["init"])


@contextlib.contextmanager
def long_timeout():
    """The long timeout inside the block (checkpoints, evaluation, anything that may keep peers waiting for
    minutes), the training timeout again after it. Every rank must enter and leave it at the same point."""
    short = _TIMEOUT["train"]
    if short is None:
        yield
        return
    _set_timeout_all(_TIMEOUT["init"])
    try:
        yield
    finally:
        _set_timeout_all(short)


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


def collective_device() -> torch.device:
    """Where tensors for a collective of the default group live: the current CUDA device under nccl, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(x: float) -> float:
    if get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=collective_device())
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
    _TIMEOUT.update(init=None, train=None)
