"""Step-folder checkpoints: atomic, keep-last-k, the stateful parts of a run saved by their own ``state_dict``.

The manager is handed the run's stateful parts (as torchtitan's checkpointer is): the engine's checkpoint I/O part
(model and optimizer, and the GradScaler under fp16: ``engine.state``), the EMA, and named host states (the trainer's counters, the LR schedule, the loader
position), each saved with its ``state_dict()`` and restored with its ``load_state_dict()``. There is no global RNG
state: every random draw of a training step comes from a generator derived from (seed, step, rank, micro-step)
(:mod:`usp_scale.training.rng`), so a resumed run draws what the uninterrupted one would.

Layout of ``<root>/step_00001000/`` (format 2)::

    meta.json            format, step, epoch, engine, world size, global batch, model signature, resolved config,
                         the size and CRC-32 of every other file, and a sha256 of meta.json's own content
    trainer.pt           rank 0: {name: state_dict} of the host states (train counters, schedule, loader position),
                         independent of the world size
    engine/dcp/          local / ddp / fsdp2: model, optimizer, EMA (and scaler) through torch.distributed.checkpoint,
                         so a checkpoint resumes on another world size or another of these engines (DCP reshards)
    engine/ds/           deepspeed: DeepSpeed's own files (same engine and world size to resume)

Format 1 (``engine/engine.pt`` and per-rank ``ranks/rank_*.pt`` RNG files) is refused with an error naming its
meta.json. A save writes into ``<root>/.tmp-step_XXXXXXXX`` and renames it at the end, so a crash mid-save never
leaves a ``step_*`` folder; ``latest()`` only considers folders with a ``meta.json``. A failed save (a full disk:
:class:`~usp_scale.fileio.DiskFullError` with the path and the space needed) removes its temporary
folder. Resuming first checks meta.json's hash and every file's size and CRC-32 (the ranks share the work), so a
truncated, overwritten, bit-flipped, deleted or swapped file is refused by name before anything is loaded; the
``.pt`` file loads with ``weights_only=True`` and DCP's files through the allowlisting reader (no code from a file
runs).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Any, Dict, Optional

import torch

from .. import runtime as D
from .diff import diff_shapes
from ..fileio import disk_full_error, folder_bytes, is_disk_full, tensor_bytes, torch_save
from .safe_load import CheckpointFileError, file_crc32, read_checked_json, torch_load, write_checked_json

STEP_RE = re.compile(r"^step_(\d{8})$")
FORMAT = 2  # meta.json "format"; see the module docstring


class IncompatibleCheckpoint(RuntimeError):
    """A checkpoint of another model / incompatible config."""


def model_signature(model: torch.nn.Module) -> Dict[str, list]:
    """name -> shape of every parameter and buffer (taken before any engine wraps the model)."""
    sig = {n: list(p.shape) for n, p in model.named_parameters()}
    sig.update({n: list(b.shape) for n, b in model.named_buffers()})
    return sig


def _flat(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def diff_signature(saved: dict, current: dict) -> list:
    return ["  " + line for line in diff_shapes(saved, current)]


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
    """``engine_state``: the engine's checkpoint I/O part (``engine.state``: :class:`~usp_scale.checkpoint.dcp.DCPState`
    or DeepSpeed's own), saved through its ``save(dir, ema_state)``/``load(dir, ema_state)``; ``ema``: an object with ``state_dict()`` giving its live tensors in the engine's layout (loaded in place);
    ``states``: name -> object with ``state_dict()``/``load_state_dict()`` of plain values, saved by rank 0 (they
    must be the same on every rank and independent of the world size)."""

    def __init__(self, root: str, keep_last: int = 3, *, engine_state=None, ema=None, states: Optional[dict] = None):
        self.root = root
        self.keep_last = keep_last
        self.engine_state, self.ema = engine_state, ema
        self.states: Dict[str, Any] = dict(states or {})

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
        """"auto" -> newest folder under root (or None); a path -> that folder (must be complete), or the newest
        complete step folder of a run folder (``OUTPUT``, holding ``checkpoints/``) or of a ``checkpoints/`` folder."""
        if not resume:
            return None
        if resume == "auto":
            names = sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
            incomplete = [n for n in names if STEP_RE.match(n) and
                          not os.path.isfile(os.path.join(self.root, n, "meta.json"))]
            if incomplete and D.get_rank() == 0:
                print(f"[usp_scale] WARNING: ignoring checkpoint folder(s) without meta.json (incomplete or damaged): "
                      f"{', '.join(os.path.join(self.root, n) for n in incomplete)}", file=sys.stderr, flush=True)
            return self.latest()
        if os.path.isfile(os.path.join(resume, "meta.json")):
            return resume
        # a run folder (OUTPUT with checkpoints/) or its checkpoints/ folder: the newest complete step in it
        for folder in (os.path.join(resume, "checkpoints"), resume):
            newest = CheckpointManager(folder).latest() if os.path.isdir(folder) else None
            if newest is not None:
                if D.get_rank() == 0:
                    print(f"[usp_scale] checkpoint.resume={resume}: the newest complete step folder in it, {newest}",
                          flush=True)
                return newest
        raise FileNotFoundError(f"checkpoint.resume={resume}: not a complete checkpoint folder (no meta.json), nor a "
                                "run folder or checkpoints/ folder holding one (step_XXXXXXXX/ with meta.json)")

    # ---------------------------------------------------------------- save
    def save(self, step: int, meta: dict) -> str:
        """Collective: every rank calls it. Returns the final folder. On a failure the temporary folder is
        removed; a full disk raises :class:`DiskFullError` naming the folder and the space it needs."""
        name = f"step_{step:08d}"
        final = os.path.join(self.root, name)
        tmp = os.path.join(self.root, f".tmp-{name}")
        rank = D.get_rank()
        engine_state, ema = self.engine_state, self.ema
        try:
            if rank == 0:
                os.makedirs(self.root, exist_ok=True)
                self._remove_leftovers()
                os.makedirs(tmp)
            D.barrier()
            engine_state.save(os.path.join(tmp, "engine"), None if ema is None else ema.state_dict())
            if rank == 0:
                torch_save({k: st.state_dict() for k, st in self.states.items()}, os.path.join(tmp, "trainer.pt"))
            D.barrier()
            files = self._checksums(tmp)  # collective
            if rank == 0:
                write_checked_json(os.path.join(tmp, "meta.json"), {**meta, "format": FORMAT, "files": files},
                                   key="meta_sha256")
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
        except BaseException as e:
            written = folder_bytes(tmp)
            full = not isinstance(e, (KeyboardInterrupt, SystemExit)) and is_disk_full(e, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise disk_full_error(final, self._estimate_bytes(engine_state, ema, written), e,
                                      note=f" (the incomplete {tmp} was removed)") from e
            raise
        return final

    def _remove_leftovers(self) -> None:
        """Temporary folders of saves that crashed or ran out of space (rank 0, before a save)."""
        for n in os.listdir(self.root):
            if n.startswith((".tmp-step_", ".old-step_")):
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)

    def _estimate_bytes(self, engine_state, ema, written: int) -> int:
        """Space a checkpoint needs: the previous one's size, else the tensors of the engine state and EMA."""
        prev = self.latest()
        if prev is not None:
            return max(folder_bytes(prev), written)
        try:
            est = tensor_bytes(engine_state.state_dict())
        except Exception:  # noqa: BLE001 - engines that only save through their own writer (DeepSpeed)
            est = 4 * sum(p.numel() * 4 for p in engine_state.model.parameters())
        if ema is not None:
            est += tensor_bytes(ema.state_dict())
        return max(est, written)

    @staticmethod
    def _checksums(folder: str) -> dict:
        """relative path -> {"bytes", "crc32"} of every file under ``folder``; rank 0 lists the files, every rank
        hashes its share (collective)."""
        names = None
        if D.get_rank() == 0:
            names = sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)
        names = D.broadcast_object(names)
        rank, world = D.get_rank(), D.get_world_size()
        mine = {n: {"bytes": os.path.getsize(os.path.join(folder, n)), "crc32": file_crc32(os.path.join(folder, n))}
                for i, n in enumerate(names) if i % world == rank}
        out = {}
        for part in D.all_gather_object(mine):
            out.update(part)
        return out

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for path in self.list_steps()[: -self.keep_last]:
            # renamed first (atomic): a kill during the removal leaves an .old-step_* folder, removed before the
            # next save, never a step folder without meta.json
            old = os.path.join(self.root, ".old-" + os.path.basename(path))
            try:
                os.replace(path, old)
            except OSError:
                old = path
            shutil.rmtree(old, ignore_errors=True)

    # ---------------------------------------------------------------- load
    @staticmethod
    def read_meta(path: str) -> dict:
        """meta.json of a step folder, its content hash checked (:class:`CheckpointFileError` when changed)."""
        meta = read_checked_json(os.path.join(path, "meta.json"), what="checkpoint metadata", key="meta_sha256")
        for k in ("step", "signature", "files"):
            if k not in meta:
                raise CheckpointFileError(f"checkpoint metadata {os.path.join(path, 'meta.json')} has no '{k}'")
        return meta

    @staticmethod
    def verify_files(path: str, meta: dict) -> None:
        """Check the size and CRC-32 of every file meta.json lists (collective: each rank checks a share, then
        all agree). Raises :class:`CheckpointFileError` naming every bad file, on every rank."""
        names = sorted(meta["files"])
        rank, world = D.get_rank(), D.get_world_size()
        bad = []
        for i, n in enumerate(names):
            if i % world != rank:
                continue
            f, want = os.path.join(path, n), meta["files"][n]
            if not os.path.isfile(f):
                bad.append(f"{f}: missing")
            elif os.path.getsize(f) != want["bytes"]:
                bad.append(f"{f}: {os.path.getsize(f)} bytes, {want['bytes']} written")
            elif file_crc32(f) != want["crc32"]:
                bad.append(f"{f}: content changed (CRC-32 {file_crc32(f)}, {want['crc32']} written)")
        bad = [b for part in D.all_gather_object(bad) for b in part]
        if bad:
            raise CheckpointFileError(
                f"checkpoint {path} is damaged (its files do not match {os.path.join(path, 'meta.json')}); "
                "refusing to resume from it:\n  " + "\n  ".join(bad) +
                "\nRestore the files, or resume from an earlier step folder with checkpoint.resume=<folder>.")

    def check(self, path: str, *, signature: dict, config: dict, world_size: int, engine_name: str,
              checkpoint_format: str = "dcp", global_batch: Optional[int] = None,
              strict_prefixes=("task", "model", "engine.name", "optim.name"), deepspeed_config: Optional[dict] = None,
              deepspeed_source: str = "") -> list:
        """Raise :class:`IncompatibleCheckpoint` listing what differs (or :class:`CheckpointFileError` for a
        damaged folder); return the non-strict differences (config keys, and keys of the merged DeepSpeed config,
        named with ``deepspeed_source``, the user's JSON). Between DCP engines (local, ddp, fsdp2) the engine and
        the world size may change (DCP reshards; the global batch must stay); DeepSpeed checkpoints resume only on
        DeepSpeed with the same world size. Collective (the file check)."""
        meta = self.read_meta(path)
        if meta.get("format") != FORMAT:
            raise IncompatibleCheckpoint(
                f"refusing to resume from {path}: {os.path.join(path, 'meta.json')} is a checkpoint of format "
                f"{meta.get('format', 1)} (engine/engine.pt or per-engine files and per-rank RNG files "
                f"ranks/rank_*.pt), this version reads format {FORMAT} (DCP, no RNG state). Resume it with the "
                "usp_scale version that wrote it, or start a new output_dir with checkpoint.init_from=<its exported "
                "model.safetensors> to keep the weights.")
        self.verify_files(path, meta)
        problems = []
        ds_lines = []
        if deepspeed_config is not None and meta.get("deepspeed_config") is not None:
            for line in diff_config(meta["deepspeed_config"], deepspeed_config, ())[1]:
                ds_lines.append(f"  DeepSpeed config{f' ({deepspeed_source})' if deepspeed_source else ''}:{line[1:]}")
        sig_diff = diff_signature(meta["signature"], signature)
        if sig_diff:
            problems.append("model parameters/buffers differ:\n" + "\n".join(sig_diff))
        saved_format = meta.get("checkpoint_format", "dcp")
        reshard = saved_format == checkpoint_format == "dcp"
        if reshard:  # the engine may change between DCP engines: not a strict key then
            strict_prefixes = [p for p in strict_prefixes if p != "engine.name"]
        strict, other = diff_config(meta.get("config", {}), config, strict_prefixes)
        if strict:
            problems.append("config keys differ:\n" + "\n".join(strict))
        if not reshard and meta.get("engine") != engine_name:
            problems.append(f"engine: checkpoint {meta.get('engine')!r} vs now {engine_name!r} (a DeepSpeed "
                            "checkpoint resumes only on DeepSpeed, and DeepSpeed only from its own checkpoints)")
        if not reshard and meta.get("world_size") != world_size:
            problems.append(f"world size: checkpoint {meta.get('world_size')} vs now {world_size} (DeepSpeed's "
                            "files are per rank; the local, ddp and fsdp2 engines reshard)")
        if global_batch is not None and meta.get("global_batch") not in (None, global_batch):
            problems.append(f"global batch: checkpoint {meta.get('global_batch')} vs now {global_batch} (set "
                            f"data.global_batch_size={meta.get('global_batch')} to keep the batch of an optimizer "
                            "step when the world size changes)")
        if problems:
            raise IncompatibleCheckpoint(
                f"refusing to resume from {path}:\n" + "\n".join(problems) +
                "\nUse the matching config, or start a new output_dir and pass checkpoint.init_from=<export> "
                "to load weights only.")
        return other + ds_lines

    def load(self, path: str) -> None:
        """Collective. Loads the engine state and EMA in place (DCP reshards them to this world size), then every
        named state from trainer.pt by its ``load_state_dict``."""
        self.engine_state.load(os.path.join(path, "engine"), None if self.ema is None else self.ema.state_dict())
        f = os.path.join(path, "trainer.pt")
        saved = torch_load(f, what="trainer state")
        missing = [k for k in self.states if k not in saved]
        if missing:
            raise CheckpointFileError(f"{f}: no state for {', '.join(missing)} (saved: {', '.join(saved)})")
        for k, st in self.states.items():
            st.load_state_dict(saved[k])
