"""The runtime of a job, started in one place: :func:`init_runtime` (every entry point calls it: the trainer,
``launchers/sample.py``, ``cache_latents.py``, ``transfer.py``, the step benchmarks).

It reads the config's resolved values (``engine.name``, ``engine.backend``, ``engine.timeout_min``, ``engine.tf32``,
``seed``, ``model.attn_backend``) and, in this order: works out the process from the launcher's environment
(:mod:`.env`), picks the device (``cuda:LOCAL_RANK`` when CUDA is available), silences the libraries' known-benign
start-up messages (:mod:`.quiet`), creates the default process group once (:mod:`.group`; also for one process when
the engine needs one) after the start-up agreement (every rank present within ``engine.startup_timeout_s``, none
failed, the same resolved config: :func:`.group.startup_agreement`), applies TF32, resolves the attention kernel
agreed over the ranks (:mod:`.attention`) and seeds the global generators. The :class:`Runtime` it returns is
handed on: its ``device`` to the engine and the loaders, its ``attn_backend`` to the model at construction.

The lowest floor of the package: it imports nothing of usp_scale but the cluster helpers (see docs/architecture.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .attention import BACKENDS, attention_spec, resolve_attention
from .env import DistInfo, detect
from .quiet import quiet_benign_warnings
from .group import (DistributedEvalError, agree_on_success, all_gather_object, all_reduce_max, barrier,
                    broadcast_object, cleanup, collective_device, end_train_timeout, get_rank, get_world_size,
                    init_process_group, long_timeout, report_startup_failure, resolve_backend, StartupError,
                    use_train_timeout)


@dataclass(frozen=True)
class Runtime:
    """What :func:`init_runtime` resolved for this process."""

    info: DistInfo
    device: torch.device
    attn_backend: str  # the attention spec every model of the job is built with (usp_scale.layers.attention)

    @property
    def rank(self) -> int:
        return get_rank()

    @property
    def world_size(self) -> int:
        return get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators from ``seed`` (the model's initialisation at start-up;
    in a training step, the draws of code that takes no generator: timm's Mixup/CutMix and drop-path)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def apply_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions (on); off restores torch's defaults (matmul off, cuDNN on)."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = True


@contextlib.contextmanager
def full_fp32():
    """No TF32 in matmuls and convolutions inside the block, restored after (for computations compared with
    float32 references: the evaluator's Inception network and its distances). A no-op without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pick_device(info: DistInfo, device: Optional[str] = None) -> torch.device:
    """``device`` when given (a tool's ``--device``), else ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU;
    a CUDA device becomes the current one."""
    if device not in (None, "", "auto"):
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def init_runtime(cfg, *, local_rank_arg: Optional[int] = None, device: Optional[str] = None) -> Runtime:
    """Start this process's runtime for the (loaded, resolved) config ``cfg``: see the module docstring. Call it
    once, first, on every rank (it is collective in a distributed job)."""
    info = detect(local_rank_arg=local_rank_arg)
    dev = pick_device(info, device)
    quiet_benign_warnings(cpu=dev.type == "cpu")   # the libraries' known-benign start-up messages (.quiet)
    engine = cfg.engine
    if info.distributed or engine.name != "local":
        init_process_group(info, resolve_backend(engine.backend, dev), engine.timeout_min,
                           single_process_group=engine.name != "local", startup_timeout_s=engine.startup_timeout_s,
                           config=dataclasses.asdict(cfg))
    apply_tf32(engine.tf32)
    requested = cfg.model.attn_backend
    spec = attention_spec(requested, resolve_attention(requested, dev))
    seed_all(cfg.seed)
    return Runtime(info=info, device=dev, attn_backend=spec)


__all__ = ["BACKENDS", "DistInfo", "DistributedEvalError", "Runtime", "agree_on_success", "all_gather_object",
           "all_reduce_max", "apply_tf32", "attention_spec", "barrier", "broadcast_object", "cleanup",
           "collective_device", "detect", "end_train_timeout", "get_rank", "get_world_size", "init_process_group",
           "init_runtime", "long_timeout", "pick_device", "quiet_benign_warnings", "report_startup_failure",
           "resolve_attention", "resolve_backend", "seed_all", "StartupError", "use_train_timeout"]
