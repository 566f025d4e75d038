"""The default process group: created once (:func:`init_process_group`, called by
:func:`usp_scale.runtime.init_runtime`), its two timeouts, and the few collectives the library uses.

Two timeouts: ``engine.timeout_min`` (long) covers start-up, the first steps (compilation), checkpoints and
evaluation; once training runs, :func:`use_train_timeout` lowers every process group's timeout to
``engine.train_timeout_s``, so a hung or unreachable peer stops the job in seconds, not half an hour, and
:func:`long_timeout` restores the long one around work that may legitimately keep peers waiting.

Every function here works without a process group (one process): the collectives then return their input.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import traceback
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from .env import DistInfo, export_env, shared_rendezvous_store_with_restarts

# The long (start-up) timeout, and the training timeout once use_train_timeout() switched to it.
_TIMEOUT = {"init": None, "train": None}


def resolve_backend(backend: str, device: torch.device) -> str:
    """``engine.backend``: "auto" -> nccl for a CUDA device, gloo otherwise."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def init_process_group(info: DistInfo, backend: str, timeout_min: int, single_process_group: bool = False) -> None:
    """Create the default process group once (a no-op when one exists). ``backend`` is resolved (nccl or gloo).

    A single process (world size 1) gets a 1-rank group only with ``single_process_group`` (DDP, FSDP2 and
    DeepSpeed need one even then; the local engine does not), on a free local port."""
    timeout = datetime.timedelta(minutes=timeout_min)
    if dist.is_initialized():
        return
    if info.distributed:
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
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        # DeepSpeed reads these even for one process started with plain `python`.
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
            os.environ.setdefault(k, v)
        dist.init_process_group(backend, rank=0, world_size=1, timeout=timeout)


def _set_timeout_all(timeout: datetime.timedelta) -> None:
    """Set the timeout of every process group this rank belongs to (the default group, DeviceMesh dimensions,
    DeepSpeed's groups); works for gloo and nccl."""
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


class DistributedEvalError(RuntimeError):
    """Work failed on some rank(s); raised on every rank by :func:`agree_on_success`."""


def agree_on_success(error: Optional[BaseException], what: str) -> None:
    """Collective status check after work that may fail on some ranks only (call it on every rank, with the
    exception this rank caught or None, before the next collective). Without a process group (or world size
    1) it re-raises ``error``. Otherwise one all_reduce tells every rank whether any rank failed; then every
    rank raises :class:`DistributedEvalError` naming the failing ranks and their errors (chained to its own
    error where it has one); rank 0's message also carries the failing ranks' tracebacks."""
    rank, world = get_rank(), get_world_size()
    if world == 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([0.0 if error is None else 1.0], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0.0:
        return
    mine = None if error is None else (f"{type(error).__name__}: {error}",
                                       "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    every = [None] * world
    dist.all_gather_object(every, mine)
    failed = [(r, e) for r, e in enumerate(every) if e is not None]
    msg = (f"{what} failed on rank{'s' if len(failed) > 1 else ''} {', '.join(str(r) for r, _ in failed)} "
           f"(of {world}); every rank stops here: " + "; ".join(f"rank {r}: {e[0]}" for r, e in failed))
    if rank == 0:
        msg += "".join(f"\n--- traceback on rank {r} ---\n{e[1]}" for r, e in failed)
    raise DistributedEvalError(msg) from error


def cleanup() -> None:
    """Destroy the default process group (end of a job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _TIMEOUT.update(init=None, train=None)
