"""Rank-0 metrics: JSONL lines, optional TensorBoard, loss-curve PNG."""
from __future__ import annotations

import json
import os
from typing import List, Optional

from ..fileio import truncate_jsonl  # noqa: F401 - MetricsLogger and the trainer use it from here


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
        try:
            from torch.utils.tensorboard import SummaryWriter
        except (ImportError, ModuleNotFoundError):
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
        import matplotlib

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
