"""Which process this is, from whatever launcher started it (reads the environment only; initialises nothing).

Reads the environment of ``python`` (one process), ``torchrun`` (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT), the ``deepspeed`` launcher (the same variables, plus ``--local_rank`` on the
command line) and SLURM's ``srun`` (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, the first host of
SLURM_JOB_NODELIST as master).

Under srun (DeepSpeed's ``--launcher slurm`` starts the ranks that way) nothing sets RANK / LOCAL_RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT: :func:`export_env` publishes them from the SLURM variables, so
``deepspeed.initialize`` and anything else that reads them sees the same ranks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..cluster.hosts import expand_slurm_nodelist


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
