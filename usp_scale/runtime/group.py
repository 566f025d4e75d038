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
import hashlib
import json
import os
import socket
import sys
import time
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
    if backend == "nccl" and device.type != "cuda":
        raise StartupError(f"engine.backend=nccl needs a CUDA GPU, and this process runs on {device} (no GPU "
                           "visible): set engine.backend=auto or gloo, or run on a GPU node")
    return backend


class StartupError(RuntimeError):
    """The ranks did not agree at start-up: a rank missing, a rank that failed before start-up, or ranks whose
    resolved configs differ (raised on every rank that took part, naming the ranks and keys)."""


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out: dict = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def config_digest(config: dict) -> tuple:
    """(sha256, flat {dotted key: repr(value)}) of a resolved config given as a nested dict."""
    flat = {k: repr(v) for k, v in sorted(_flat(config).items())}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest(), flat


def _startup_prefix() -> str:
    # the agent's store outlives a torchrun restart: one namespace per round
    return f"usp_scale/startup/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def _rendezvous_store(info: DistInfo, timeout: datetime.timedelta):
    """The env:// rendezvous store (rank 0 hosts it, or torchrun's agent does), reached within ``timeout``."""
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    try:
        # as torch's env:// rendezvous, except that rank 0 does not wait for the workers here (the agreement names
        # the missing ones): torchrun's agent hosts the store when it shares it, else rank 0
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(host, port, info.world_size, is_master=info.rank == 0 and not agent, timeout=timeout,
                              wait_for_workers=False, multi_tenant=True)
    except (RuntimeError, ValueError, OSError) as e:  # DistNetworkError/DistStoreError derive from RuntimeError
        raise StartupError(f"start-up: rank {info.rank} of {info.world_size} could not reach the rendezvous at "
                           f"{host}:{port} within {timeout.total_seconds():.0f} s (engine.startup_timeout_s): rank 0 "
                           "did not start, failed before start-up, or MASTER_ADDR/MASTER_PORT differ between ranks "
                           f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
    return store


def report_startup_failure(info: DistInfo, timeout_s: float, error: str) -> None:
    """A rank that fails before :func:`init_process_group` (its config does not load) tells the others, so they
    stop naming it instead of waiting for the collective timeout. Best effort: gives up silently after
    ``timeout_s``. Rank 0 (which hosts the rendezvous) waits until the other ranks have read it."""
    if not info.distributed or dist.is_initialized():  # past start-up: the agreement is over
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = _rendezvous_store(info, timeout)
        store.set(_startup_prefix() + str(info.rank), json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                                  "error": error}))
        if info.rank == 0:
            _wait_read(store, info.world_size, timeout_s)
    except Exception:  # noqa: BLE001 - reporting is a courtesy; the rank exits with its own error anyway
        pass


def _wait_read(store, world: int, timeout_s: float) -> None:
    """Rank 0 keeps the store it hosts alive until every rank has read the start-up reports (or ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if store.add(_startup_prefix() + "read", 0) >= world - 1:
            return
        time.sleep(0.05)


def startup_agreement(info: DistInfo, store, timeout_s: float, config: Optional[dict]) -> None:
    """Every rank posts (host, pid, config digest) under its rank and waits at most ``timeout_s`` for all others:
    a rank that never arrives is named (:class:`StartupError`), as is one that reported a failure
    (:func:`report_startup_failure`) or whose resolved ``config`` differs from rank 0's (with the differing keys)."""
    prefix = _startup_prefix()
    digest, flat = config_digest(config) if config is not None else (None, {})
    store.set(prefix + str(info.rank), json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "error": None,
                                                   "digest": digest, "config": flat}))
    keys = [prefix + str(r) for r in range(info.world_size)]
    deadline = time.monotonic() + timeout_s
    while True:  # poll (not store.wait) so that the missing ranks can be named
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if missing:
        raise StartupError(f"start-up: rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
                           f"{info.world_size} did not arrive within {timeout_s:.0f} s (engine.startup_timeout_s): "
                           "not started, crashed, or started with another WORLD_SIZE/MASTER_PORT; every rank stops")
    posts = {r: json.loads(store.get(k)) for r, k in enumerate(keys)}
    if info.rank != 0:
        store.add(prefix + "read", 1)
    else:
        _wait_read(store, info.world_size, timeout_s)
    failed = {r: p for r, p in posts.items() if p.get("error")}
    if failed:
        raise StartupError("start-up failed on " + "; ".join(
            f"rank {r} (host {p['host']}, pid {p['pid']}): {p['error']}" for r, p in sorted(failed.items()))
            + "; every rank stops")
    if config is not None:
        ref = posts[0]
        differ = {r: p for r, p in posts.items() if p["digest"] != ref["digest"]}
        if differ:
            lines = []
            for r, p in sorted(differ.items()):
                keys_diff = sorted(k for k in set(p["config"]) | set(ref["config"])
                                   if p["config"].get(k) != ref["config"].get(k))
                shown = ", ".join(f"{k}={p['config'].get(k, '<absent>')} (rank 0: {ref['config'].get(k, '<absent>')})"
                                  for k in keys_diff[:8]) + (f", ... {len(keys_diff) - 8} more" if len(keys_diff) > 8
                                                             else "")
                lines.append(f"rank {r} (host {p['host']}): {shown}")
            raise StartupError("start-up: the ranks' resolved configs differ (every rank must run the same recipe "
                               "and overrides): " + "; ".join(lines))


def init_process_group(info: DistInfo, backend: str, timeout_min: int, single_process_group: bool = False, *,
                       startup_timeout_s: Optional[float] = None, config: Optional[dict] = None) -> None:
    """Create the default process group once (a no-op when one exists). ``backend`` is resolved (nccl or gloo).

    With ``startup_timeout_s`` (:func:`usp_scale.runtime.init_runtime` passes ``engine.startup_timeout_s`` and the
    resolved config) a distributed job first runs :func:`startup_agreement` on the rendezvous store, so a missing
    or failing rank or a differing config is named within that time, not after ``timeout_min``.

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
        if startup_timeout_s is None:
            dist.init_process_group(init_method="env://", **kwargs)
        else:
            store = _rendezvous_store(info, datetime.timedelta(seconds=startup_timeout_s))
            startup_agreement(info, store, startup_timeout_s, config)
            store.set_timeout(timeout)
            dist.init_process_group(store=dist.PrefixStore("default_pg", store), **kwargs)
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
