"""The run's metrics: the log window of the optimizer steps since the last record (loss, throughput, MFU, grad norm,
data time; :class:`LogWindow`), the rank-0 writer (JSON lines, optional TensorBoard, loss-curve PNG;
:class:`MetricsLogger`), and the truncation of the records a stopped run wrote after its last checkpoint
(:func:`truncate_after_resume`).

MFU = train FLOPs per sample (the task's count: :meth:`usp_scale.training.tasks.Task.train_flops_per_sample`) x
samples/s / world size / ``peak_flops``.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import types
import warnings
from typing import List, Optional

import torch
import torch.distributed as dist

from ..eval.hook import truncate_eval_records
from ..fileio import truncate_jsonl
from ..runtime import agree_on_success


_TB_MISSING_WARNED = False


def _warn_tensorboard_missing() -> None:
    """Once per process: the config asks for TensorBoard events but the package is not installed."""
    global _TB_MISSING_WARNED
    if _TB_MISSING_WARNED:
        return
    _TB_MISSING_WARNED = True
    warnings.warn("tensorboard: true (the config key) but tensorboard is not installed, so no TensorBoard events are "
                  "written (metrics.jsonl still is): pip install 'usp_scale[log]' (or tensorboard), or set "
                  "tensorboard=false to silence this", RuntimeWarning, stacklevel=3)


def no_tensorflow_for_tensorboard() -> None:
    """Make tensorboard write events through its own TensorFlow stub instead of importing TensorFlow.

    tensorboard imports TensorFlow when it is installed (its ``compat.tf``), only to write event files, which its stub
    (``tensorboard.compat.tensorflow_stub``, what it uses where TensorFlow is absent) writes identically. Importing
    TensorFlow costs every rank several seconds of start-up and prints TensorFlow's C++ log lines (absl's
    "InitializeLog", cpu_feature_guard). tensorboard takes the stub when a module ``tensorboard.compat.notf`` can be
    imported (the marker its no-TensorFlow builds ship): this registers that marker. Safe because this process only
    writes events; it is skipped when TensorFlow is already imported (a process that uses it keeps tensorboard's
    default)."""
    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


class MetricsLogger:
    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        self.history: List[dict] = []
        # TensorBoard writer, opened at the first record so that a resume can set its purge step first.
        self._tb_dir = os.path.join(output_dir, "tb") if (enabled and tensorboard) else None
        self._purge_step: Optional[int] = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)

    def _open_tb(self) -> None:
        tb_dir, self._tb_dir = self._tb_dir, None
        no_tensorflow_for_tensorboard()
        try:  # tensorboard is optional: this is its one adapter
            from torch.utils.tensorboard import SummaryWriter
        except (ImportError, ModuleNotFoundError):
            _warn_tensorboard_missing()
            return
        # purge_step: TensorBoard hides the events at and after it that an interrupted run left behind
        self.tb = SummaryWriter(tb_dir, purge_step=self._purge_step)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.history.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb_dir is not None:
            self._open_tb()
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> int:
        """Drop records past ``step`` (written by a run that crashed after its last checkpoint); returns #dropped.
        TensorBoard events past ``step`` are purged when its writer opens."""
        if not self.enabled:
            return 0
        self._purge_step = step + 1
        return truncate_jsonl(self.path, step)

    def read_all(self) -> List[dict]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def plot(self, out_png: str, title: str = "") -> Optional[str]:
        """Loss curve of every ``loss`` record in metrics.jsonl (including earlier, resumed runs)."""
        if not self.enabled:
            return None
        recs = [r for r in self.read_all() if "loss" in r and r.get("kind", "train") == "train"]
        if not recs:
            return None
        import matplotlib  # optional (the plot extra): this is its one adapter

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_png, dpi=100)
        plt.close(fig)
        return out_png

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def max_memory_gb(device) -> float:
    """Peak memory of this process: CUDA's allocated peak on a GPU, the resident set's peak on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is KiB on Linux


class LogWindow:
    """The optimizer steps since the last metrics record: what the next record averages over. The loss stays on the
    device (no host sync per step); :meth:`record` reads it, averaged over ranks (collective)."""

    def __init__(self, device, world: int, train_flops: Optional[float], peak_flops: float):
        self.device, self.world, self.train_flops, self.peak_flops = device, world, train_flops, peak_flops
        self.reset()

    def reset(self) -> None:
        self.steps, self.samples, self.data, self.t0 = 0, 0, 0.0, time.perf_counter()
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.gnorm, self.gnorm_n, self.nonfinite_steps = 0.0, 0, []

    def add_step(self, loss: torch.Tensor, samples: int) -> None:
        """One optimizer step: its mean micro-batch loss (a device tensor) and its global batch."""
        self.steps += 1
        self.loss += loss
        self.samples += samples

    def add_data_time(self, seconds: float) -> None:
        self.data += seconds

    def add_grad_norm(self, norm: float) -> None:
        self.gnorm += norm
        self.gnorm_n += 1

    def add_nonfinite(self, step: int) -> None:
        self.nonfinite_steps.append(step)

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (a checkpoint, an evaluation) out of the throughput numbers."""
        self.t0 += seconds

    def record(self, state, lr: float) -> dict:
        """The metrics record of the window at ``state`` (collective)."""
        n = self.steps
        lsum = self.loss.clone()
        if self.world > 1:
            lsum = lsum.to(torch.float64)
            dist.all_reduce(lsum)
            lsum /= self.world
        dt = time.perf_counter() - self.t0
        sps = self.samples / max(dt, 1e-9)
        rec = {"kind": "train", "step": state.step, "epoch": state.epoch, "loss": float(lsum) / n, "lr": lr,
               # mean over the applied steps (None when every step of the window was non-finite)
               "grad_norm": self.gnorm / self.gnorm_n if self.gnorm_n else None,
               "samples_per_s": sps, "nonfinite": len(self.nonfinite_steps),
               # The device runs ahead of the host (no sync per step): compute_time is the wall time
               # not spent waiting for the loader, which is exact over a window that ends in a sync.
               "data_time": self.data / n, "compute_time": max(dt - self.data, 0.0) / n,
               "max_mem_gb": max_memory_gb(self.device), "nonfinite_total": state.nonfinite_total}
        if self.train_flops:
            rec["mfu"] = self.train_flops * sps / self.world / self.peak_flops
        return rec


def truncate_after_resume(step: int, logger: MetricsLogger, eval_file: str, is_main: bool) -> None:
    """On resume at ``step``: drop the records past ``step`` from every JSON-lines file the run appends to
    (metrics.jsonl, the FID hook's ``eval.metrics_file`` and its .txt), written after the checkpoint by the run that
    stopped (or by a later run, when resuming an earlier checkpoint). Rank 0 edits the files; collective (a failure
    there, e.g. a corrupt line, stops every rank with its message)."""
    err = None
    if is_main:
        try:
            for path, n in ((logger.path, logger.truncate_after(step)),
                            (eval_file, truncate_eval_records(eval_file, step))):
                if n:
                    print(f"[usp_scale] {os.path.basename(path)}: dropped {n} record(s) past step {step} (written "
                          "after the checkpoint)", flush=True)
        except Exception as e:  # noqa: BLE001 -- agreed over ranks, re-raised below
            err = e
    agree_on_success(err, f"resume at step {step}: truncating the metrics files")
