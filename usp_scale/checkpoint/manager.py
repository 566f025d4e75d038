"""Step-folder checkpoints: atomic, keep-last-k, everything needed for an exact resume.

Layout of ``<root>/step_00001000/``::

    meta.json            step, epoch, engine, world size, model signature, resolved config (written last)
    trainer.pt           rank 0: step/epoch counters, LR schedule, non-finite counters
    ranks/rank_00000.pt  every rank: RNG states (python, numpy, torch, cuda) and data-loader position
    engine/              engine-specific: engine.pt (local/ddp), dcp/ (fsdp2), ds/ (deepspeed)

A save writes into ``<root>/.tmp-step_XXXXXXXX`` and renames it at the end, so a crash mid-save
never leaves a ``step_*`` folder; ``latest()`` only considers folders with a ``meta.json``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..engine import dist as D

STEP_RE = re.compile(r"^step_(\d{8})$")


class IncompatibleCheckpoint(RuntimeError):
    """A checkpoint of another model / incompatible config."""


def model_signature(model: torch.nn.Module) -> Dict[str, list]:
    """name -> shape of every parameter and buffer (taken before any engine wraps the model)."""
    sig = {n: list(p.shape) for n, p in model.named_parameters()}
    sig.update({n: list(b.shape) for n, b in model.named_buffers()})
    return sig


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if torch.cuda.is_available() and "cuda" in st:
        torch.cuda.set_rng_state_all(st["cuda"])


def _flat(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def diff_signature(saved: dict, current: dict) -> list:
    lines = []
    for k in sorted(set(saved) | set(current)):
        if k not in current:
            lines.append(f"  {k}: in checkpoint {saved[k]}, not in the model")
        elif k not in saved:
            lines.append(f"  {k}: in the model {current[k]}, not in checkpoint")
        elif list(saved[k]) != list(current[k]):
            lines.append(f"  {k}: checkpoint shape {saved[k]} vs model {current[k]}")
    return lines


def diff_config(saved: dict, current: dict, strict_prefixes) -> tuple:
    """(strict differences, other differences) between two resolved config dicts."""
    fs, fc = _flat(saved), _flat(current)
    strict, other = [], []
    for k in sorted(set(fs) | set(fc)):
        if fs.get(k, "<absent>") == fc.get(k, "<absent>"):
            continue
        line = f"  {k}: checkpoint {fs.get(k, '<absent>')!r} vs now {fc.get(k, '<absent>')!r}"
        (strict if any(k == p or k.startswith(p + ".") for p in strict_prefixes) else other).append(line)
    return strict, other


class CheckpointManager:
    def __init__(self, root: str, keep_last: int = 3):
        self.root = root
        self.keep_last = keep_last

    # ---------------------------------------------------------------- listing
    def list_steps(self) -> list:
        """Complete step folders, oldest first."""
        if not os.path.isdir(self.root):
            return []
        out = []
        for name in os.listdir(self.root):
            m = STEP_RE.match(name)
            if m and os.path.isfile(os.path.join(self.root, name, "meta.json")):
                out.append((int(m.group(1)), os.path.join(self.root, name)))
        return [p for _, p in sorted(out)]

    def latest(self) -> Optional[str]:
        steps = self.list_steps()
        return steps[-1] if steps else None

    def resolve(self, resume: str) -> Optional[str]:
        """"auto" -> newest folder under root (or None); a path -> that folder (must be complete)."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        if not os.path.isfile(os.path.join(resume, "meta.json")):
            raise FileNotFoundError(f"checkpoint.resume={resume}: not a complete checkpoint folder (no meta.json)")
        return resume

    # ---------------------------------------------------------------- save
    def save(self, step: int, engine, *, ema=None, trainer_state: dict, rank_state: dict, meta: dict) -> str:
        """Collective: every rank calls it. Returns the final folder."""
        name = f"step_{step:08d}"
        final = os.path.join(self.root, name)
        tmp = os.path.join(self.root, f".tmp-{name}")
        rank = D.get_rank()
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(os.path.join(tmp, "ranks"))
        D.barrier()
        engine.save(os.path.join(tmp, "engine"), None if ema is None else ema.state_dict())
        torch.save({"rng": rng_state(), **rank_state}, os.path.join(tmp, "ranks", f"rank_{rank:05d}.pt"))
        D.barrier()
        if rank == 0:
            torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):  # re-saving a step: swap atomically, then delete the old one
                old = os.path.join(self.root, f".old-{name}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            self._prune()
        D.barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for path in self.list_steps()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------- load
    @staticmethod
    def read_meta(path: str) -> dict:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f)

    def check(self, path: str, *, signature: dict, config: dict, world_size: int, engine_name: str,
              strict_prefixes=("task", "model", "engine.name", "optim.name")) -> list:
        """Raise :class:`IncompatibleCheckpoint` listing what differs; return the non-strict differences."""
        meta = self.read_meta(path)
        problems = []
        sig_diff = diff_signature(meta["signature"], signature)
        if sig_diff:
            problems.append("model parameters/buffers differ:\n" + "\n".join(sig_diff))
        strict, other = diff_config(meta.get("config", {}), config, strict_prefixes)
        if strict:
            problems.append("config keys differ:\n" + "\n".join(strict))
        if meta.get("engine") != engine_name:
            problems.append(f"engine: checkpoint {meta.get('engine')!r} vs now {engine_name!r} "
                            "(engine state formats differ)")
        if meta.get("world_size") != world_size:
            problems.append(f"world size: checkpoint {meta.get('world_size')} vs now {world_size} "
                            "(per-rank RNG and data positions cannot be mapped)")
        if problems:
            raise IncompatibleCheckpoint(
                f"refusing to resume from {path}:\n" + "\n".join(problems) +
                "\nUse the matching config, or start a new output_dir and pass checkpoint.init_from=<export> "
                "to load weights only.")
        return other

    def load(self, path: str, engine, *, ema=None) -> tuple:
        """Collective. Loads engine state and EMA in place; returns (trainer_state, rank_state)."""
        engine.load(os.path.join(path, "engine"), None if ema is None else ema.state_dict())
        trainer_state = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=False)
        rank_file = os.path.join(path, "ranks", f"rank_{D.get_rank():05d}.pt")
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        return trainer_state, rank_state
