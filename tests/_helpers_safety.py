"""Helpers for the file-safety tests: a malicious pickle, small real runs and checkpoints, forged checksums."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

import _helpers_train as H

REPO = H.REPO


class Payload:
    """Unpickling this runs ``touch MARKER`` (what a malicious checkpoint's ``__reduce__`` would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_save(path: str, marker: str, base=None) -> str:
    """torch.save ``base`` (default: an official-style MAE checkpoint) with the payload under "args"."""
    obj = dict(base) if base is not None else {"model": {"w": torch.zeros(2)}}
    obj["args"] = Payload(marker)
    torch.save(obj, path)
    return path


def assert_payload_did_not_run(marker: str) -> None:
    assert not os.path.exists(marker), f"the pickle payload ran: {marker} exists"


def tiny_cfg(out: str, **over):
    """The synthetic-latent tiny MAE (local engine, fp32): seconds per run."""
    base = {"schedule.max_steps": 4, "ema.decay": 0.9, "checkpoint.every_steps": 2}
    base.update(over)
    return H.trainer_cfg("local", out, **base)


def run_tiny(out: str, **over) -> dict:
    from usp_scale.training import run

    return run(tiny_cfg(out, **over))


def forge_meta(step_dir: str) -> None:
    """Recompute meta.json's file checksums and its own hash, as someone who replaced a file on purpose would:
    the file checks then pass and only the safe loader stands between the file and code execution."""
    from usp_scale.checkpoint.manager import CheckpointManager
    from usp_scale.checkpoint.safe_load import write_checked_json

    meta = CheckpointManager.read_meta(step_dir)
    meta["files"] = CheckpointManager._checksums(step_dir)
    meta["files"].pop("meta.json", None)
    write_checked_json(os.path.join(step_dir, "meta.json"), meta, key="meta_sha256")


def launcher(name: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = H.child_env()
    return subprocess.run([sys.executable, os.path.join(REPO, "launchers", name), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
