"""Collective agreement after work that may fail on some ranks only (no torch-fidelity needed: the trainer uses it
when it resumes, with or without the optional ``eval`` extra)."""
from __future__ import annotations

from typing import Optional

import torch

from ..engine.dist import collective_device, get_rank, get_world_size


class DistributedEvalError(RuntimeError):
    """Evaluation work failed on some rank(s); raised on every rank by :func:`agree_on_success`."""


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
    import traceback

    flag = torch.tensor([0.0 if error is None else 1.0], device=collective_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() == 0.0:
        return
    mine = None if error is None else (f"{type(error).__name__}: {error}",
                                       "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    every = [None] * world
    torch.distributed.all_gather_object(every, mine)
    failed = [(r, e) for r, e in enumerate(every) if e is not None]
    msg = (f"{what} failed on rank{'s' if len(failed) > 1 else ''} {', '.join(str(r) for r, _ in failed)} "
           f"(of {world}); every rank stops here: " + "; ".join(f"rank {r}: {e[0]}" for r, e in failed))
    if rank == 0:
        msg += "".join(f"\n--- traceback on rank {r} ---\n{e[1]}" for r, e in failed)
    raise DistributedEvalError(msg) from error
