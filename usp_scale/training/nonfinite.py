"""The non-finite policy: every optimizer step whose loss or gradients were not finite is skipped by the engine and
counted here; the run stops (after a checkpoint) when ``max_nonfinite`` steps in a row, or more than
``max_nonfinite_rate`` of the last ``nonfinite_window`` steps, were non-finite.

The counters live in the trainer's :class:`~usp_scale.training.state.TrainState` (saved with every checkpoint, so
a resumed run counts on), the window's share in the :class:`~usp_scale.training.metrics.LogWindow`.
"""
from __future__ import annotations

import math
import sys
from typing import Iterable, Optional, Tuple


class NonFiniteError(RuntimeError):
    """Too many non-finite steps (in a row, or as a rate over a window); a checkpoint was written first."""


class NonFinitePolicy:
    """Folds step results read back from the device (``(step, (applied, grad norm), lr)``, one step late) into the
    counters and the log window, and says when the run must stop."""

    def __init__(self, cfg, state):
        self.cfg, self.state = cfg, state
        self.last_norm = float("nan")

    def account(self, entries: Iterable, window, check: bool = True) -> Optional[Tuple[int, str, float, float]]:
        """Returns (step, reason, lr, grad norm) of the first step at which the non-finite streak reached
        ``max_nonfinite`` or the non-finite steps among the last ``nonfinite_window`` exceeded
        ``max_nonfinite_rate`` (when ``check``), else None."""
        cfg, st = self.cfg, self.state
        hit = None
        for s_done, (ok_f, norm_f), lr_f in entries:
            self.last_norm = norm_f
            while st.nonfinite_recent and st.nonfinite_recent[0] <= s_done - cfg.nonfinite_window:
                st.nonfinite_recent.popleft()
            if ok_f and math.isfinite(norm_f):
                window.add_grad_norm(norm_f)
            if ok_f:
                st.nonfinite_streak = 0
                continue
            st.nonfinite_total += 1
            st.nonfinite_streak += 1
            st.nonfinite_recent.append(s_done)
            window.add_nonfinite(s_done)
            if hit is not None or not check:
                continue
            rate_hit = cfg.max_nonfinite_rate > 0 and \
                len(st.nonfinite_recent) > cfg.max_nonfinite_rate * cfg.nonfinite_window
            if st.nonfinite_streak >= cfg.max_nonfinite > 0:
                hit = (s_done, f"{st.nonfinite_streak} consecutive non-finite steps (max_nonfinite="
                               f"{cfg.max_nonfinite})", lr_f, norm_f)
            elif rate_hit:
                hit = (s_done, f"{len(st.nonfinite_recent)} non-finite steps among the last {cfg.nonfinite_window} "
                               f"(more than max_nonfinite_rate={cfg.max_nonfinite_rate:g} of nonfinite_window="
                               f"{cfg.nonfinite_window})", lr_f, norm_f)
        return hit

    def error(self, hit, *, checkpoint: str, micro_batches: int, rank: int) -> NonFiniteError:
        """The error of a stop at ``hit`` (from :meth:`account`), after the checkpoint ``checkpoint``."""
        cfg, st = self.cfg, self.state
        s_bad, reason, lr_bad, norm_bad = hit
        lr_key = "optim.lr" if cfg.optim.lr > 0 else "optim.blr"  # the key that sets the lr here
        return NonFiniteError(
            f"{reason}, non-finite loss or gradients at optimizer step {s_bad}, epoch {st.epoch}, near "
            f"micro-batch {st.micro_in_epoch}/{micro_batches} of the epoch, lr {lr_bad:.3e}, grad norm "
            f"{norm_bad}; rank {rank}. Checkpoint written to {checkpoint} (step {st.step}). Lower {lr_key} "
            f"(now {getattr(cfg.optim, lr_key.split('.')[1]):g}), set optim.clip_grad, or use a wider "
            f"precision (engine.precision=bf16/fp32).")

    def warn(self, window) -> None:
        """Rank 0, at a log step: the non-finite steps the window skipped, on stderr."""
        cfg, st = self.cfg, self.state
        n, bad = window.steps, window.nonfinite_steps
        if not bad:
            return
        print(f"[usp_scale] WARNING: {len(bad)} of the last {n} optimizer steps were non-finite and skipped (steps "
              f"{bad[:8]}{' ...' if len(bad) > 8 else ''}); {st.nonfinite_total} in the run so far, "
              f"{len(st.nonfinite_recent)} in the last {cfg.nonfinite_window} (the run stops above "
              f"{cfg.max_nonfinite_rate:g} x {cfg.nonfinite_window} or at {cfg.max_nonfinite} in a row)",
              file=sys.stderr, flush=True)
