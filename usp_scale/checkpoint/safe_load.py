"""Reading and writing weight files without running code from them, and with errors that name the file.

* :func:`torch_load` is the only way the project reads a ``torch.save`` file: ``torch.load(weights_only=True)``
  with an explicit allowlist (:data:`ALLOWED_GLOBALS`: ``argparse.Namespace``, which the official MAE, USP and
  DiT/SiT checkpoints keep under ``"args"``). Tensors, plain containers (dict, list, tuple, set), numbers,
  strings, ``torch.Size``/dtypes/devices load as usual; a file that needs any other Python object is refused
  with :class:`UnsafeCheckpointError`, naming the file and every type it wanted. Nothing in the file runs.
* :func:`read_safetensors` / :func:`read_json` read those formats and turn every reader failure (truncated,
  overwritten, not that format) into :class:`CheckpointFileError` naming the file.
* :func:`atomic_write` writes through a temporary name and renames; on a failure it removes the temporary file,
  and a full disk is reported as :class:`DiskFullError` with the path, the free space and the space needed.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import pickle
import re
import shutil
from typing import Iterable, Optional

import torch

# What the official checkpoints hold besides tensors and plain containers.
ALLOWED_GLOBALS = (argparse.Namespace,)


class CheckpointFileError(RuntimeError):
    """A weight, checkpoint or manifest file that cannot be read (truncated, damaged, wrong format)."""


class UnsafeCheckpointError(CheckpointFileError):
    """A ``torch.save`` file that needs Python objects outside the allowlist (loading it would run code)."""


class DiskFullError(OSError):
    """A write that failed because the file system is full; names the path and the space needed."""


def _allowed_names() -> str:
    return ", ".join(f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS)


def _unsafe_globals(path: str) -> list:
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file: fall back to the unpickler's message
        return []


def torch_load(path: str, *, what: str = "checkpoint", extra_globals: Iterable = (), map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with :data:`ALLOWED_GLOBALS` (+ ``extra_globals``).

    Raises :class:`FileNotFoundError`, :class:`UnsafeCheckpointError` (names the file and the types it wanted)
    or :class:`CheckpointFileError` (truncated or damaged: names the file); never runs code from the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    allowed = list(ALLOWED_GLOBALS) + list(extra_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        wanted = _unsafe_globals(path) or re.findall(r"GLOBAL ([\w.]+)", str(e))
        if not wanted:  # not a disallowed type: a damaged pickle stream
            raise CheckpointFileError(f"cannot read {what} {path}: the pickle inside is damaged "
                                      f"({str(e).strip().splitlines()[-1] if str(e).strip() else 'no detail'})") from e
        raise UnsafeCheckpointError(
            f"refusing to load {what} {path}: it needs the Python type(s) {', '.join(sorted(set(wanted)))}, which "
            f"only loading with code execution could build (allowed besides tensors and plain containers: "
            f"{_allowed_names()}). Nothing from the file was run. If the file is yours and you trust it, re-save "
            f"its tensors as a plain dict or .safetensors.") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise CheckpointFileError(f"cannot read {what} {path}: {type(e).__name__}: {str(e).strip() or 'no detail'}"
                                  f" ({os.path.getsize(path)} bytes; the file is truncated, damaged or not a "
                                  f"torch.save file)") from e


CONTENT_KEY = "usp_scale_sha256"  # safetensors metadata: sha256 of the tensors (names, dtypes, shapes, bytes)


def tensors_sha256(tensors: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of the file layout)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def read_safetensors(path: str, *, what: str = "weights file", with_metadata: bool = False):
    """Every tensor of a .safetensors file (CPU); reader failures become :class:`CheckpointFileError`.

    A file this project wrote carries :data:`CONTENT_KEY` in its metadata: the tensors are checked against it,
    so a changed byte (same size) is refused by name. ``with_metadata``: return (tensors, metadata)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointFileError(f"cannot read {what} {path}: {type(e).__name__}: {e} ({os.path.getsize(path)} "
                                  "bytes; the file is truncated, damaged or not a safetensors file)") from e
    if CONTENT_KEY in meta and tensors_sha256(tensors) != meta[CONTENT_KEY]:
        raise CheckpointFileError(f"{what} {path} has changed since it was written: its tensors do not match the "
                                  "sha256 in its metadata (the file is damaged); restore or re-export it")
    return (tensors, meta) if with_metadata else tensors


def read_json(path: str, *, what: str = "file"):
    """``json.load`` with the path in every error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointFileError(f"cannot read {what} {path}: not valid JSON ({e}); the file is truncated or "
                                  "damaged") from e


# --------------------------------------------------------------------------- writing

def _free_bytes(path: str) -> int:
    folder = os.path.abspath(path)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def is_disk_full(exc: BaseException, path: Optional[str] = None, needed: Optional[int] = None) -> bool:
    """True when ``exc`` (or an exception it was raised from) says the file system is full, or, with ``path``
    (call it before removing a partial file), when a failed write left less free space there than ``needed``
    (or under 1 MiB): torch.save reports a short write only as "unexpected pos ...", without an errno."""
    seen = set()
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    if path is None:
        return False
    with contextlib.suppress(OSError):
        return _free_bytes(path) < max(needed or 0, 1 << 20)
    return False


def folder_bytes(path: str) -> int:
    """Total size of the files under ``path`` (0 when it does not exist)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_full_error(path: str, needed: Optional[int], exc: BaseException, note: str = "") -> DiskFullError:
    """A :class:`DiskFullError` for a failed write of ``path`` (``needed`` bytes, when known)."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    need = f"about {_human(needed)}" if needed else "more than is free"
    err = DiskFullError(errno.ENOSPC, f"disk full: writing {path} needs {need}; the file system of {folder} had "
                                      f"{_human(free)} free when the write failed{note}. Free space or choose another "
                                      "output folder; nothing partial was left behind", path)
    err.__cause__ = exc
    return err


@contextlib.contextmanager
def atomic_write(path: str, needed: Optional[int] = None):
    """Yield a temporary path next to ``path``; rename it to ``path`` when the block succeeds. On any failure the
    temporary file is removed; a full disk is re-raised as :class:`DiskFullError`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        full = not isinstance(e, (KeyboardInterrupt, SystemExit)) and is_disk_full(e, tmp, needed)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if full:
            raise disk_full_error(path, needed, e) from e
        raise


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside nested dicts/lists/tuples (an estimate of a ``torch.save``'s size)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def torch_save(obj, path: str) -> str:
    """``torch.save`` through :func:`atomic_write` (a full disk names the path and the bytes needed)."""
    with atomic_write(path, needed=tensor_bytes(obj)) as tmp:
        torch.save(obj, tmp)
    return path


def save_safetensors_file(tensors: dict, path: str, metadata: Optional[dict] = None) -> str:
    """``safetensors.torch.save_file`` through :func:`atomic_write`, with the tensors' sha256 in the metadata
    (:data:`CONTENT_KEY`; :func:`read_safetensors` checks it)."""
    from safetensors.torch import save_file

    meta = {**(metadata or {}), CONTENT_KEY: tensors_sha256(tensors)}
    with atomic_write(path, needed=tensor_bytes(tensors)) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


# --------------------------------------------------------------------------- self-checked JSON and file checksums

def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def write_checked_json(path: str, obj: dict, key: str = "self_sha256") -> dict:
    """Write ``obj`` plus ``key`` = sha256 of its canonical JSON (atomically, fsynced); returns what was written.

    :func:`read_checked_json` recomputes the hash, so any change to the file's content is detected."""
    import hashlib

    body = json.loads(_canonical({k: v for k, v in obj.items() if k != key}))
    out = {**body, key: hashlib.sha256(_canonical(body)).hexdigest()}
    with atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    return out


def read_checked_json(path: str, *, what: str, key: str = "self_sha256", required: bool = True) -> dict:
    """Read a file written by :func:`write_checked_json`; a changed file is a :class:`CheckpointFileError`.
    ``required=False`` accepts a file without ``key`` (written before files carried the hash)."""
    import hashlib

    obj = read_json(path, what=what)
    if not isinstance(obj, dict):
        raise CheckpointFileError(f"cannot read {what} {path}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        if required:
            raise CheckpointFileError(f"{what} {path} carries no content hash ('{key}'): it was written by an "
                                      "older usp_scale or edited by hand, so its integrity cannot be checked")
        return obj
    body = {k: v for k, v in obj.items() if k != key}
    if hashlib.sha256(_canonical(body)).hexdigest() != obj[key]:
        raise CheckpointFileError(f"{what} {path} has changed since it was written (its content hash does not "
                                  "match): the file is damaged, edited or swapped; restore it or write it again")
    return body


def file_crc32(path: str, chunk: int = 1 << 22) -> str:
    """CRC-32 of a file's bytes as 8 hex digits (about 5 GB/s: corruption detection, not a security hash)."""
    import zlib

    crc = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            crc = zlib.crc32(b, crc)
    return f"{crc:08x}"


# --------------------------------------------------------------------------- torch.distributed.checkpoint (FSDP2)

def _dcp_global_allowed(module: str, name: str) -> bool:
    import importlib

    if (module, name) in (("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                          ("builtins", "set"), ("builtins", "frozenset")):
        return True
    if module == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), torch.dtype)
    if module.startswith("torch.distributed.checkpoint."):  # the metadata dataclasses and enums, not functions
        obj = getattr(importlib.import_module(module), name, None)
        return isinstance(obj, type)
    return False


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` (its dataclasses, torch.Size, dtypes, paths) and refuses anything else."""

    def __init__(self, f, path: str):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if not _dcp_global_allowed(module, name):
            raise UnsafeCheckpointError(f"refusing to load checkpoint metadata {self.path}: it needs the Python "
                                        f"type {module}.{name}, which is not part of torch.distributed.checkpoint "
                                        "metadata. Nothing from the file was run.")
        return super().find_class(module, name)


def dcp_load(state: dict, folder: str) -> None:
    """``torch.distributed.checkpoint.load(state, folder)`` without unpickling code: the ``.metadata`` file goes
    through an allowlisting unpickler and the non-tensor items through :func:`torch_load`'s ``weights_only``."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    errors: list = []  # DCP folds exceptions into strings: keep ours to raise them as they are

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank_local = kwargs.get("rank") is not None
            path = os.path.join(str(self.path), f"__{kwargs['rank']}.metadata" if rank_local else ".metadata")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint metadata not found: {path}")
            with open(path, "rb") as f:
                try:
                    metadata = _DCPMetadataUnpickler(f, path).load()
                except UnsafeCheckpointError as e:
                    errors.append(e)
                    raise
                except Exception as e:  # noqa: BLE001 - a damaged pickle stream
                    errors.append(CheckpointFileError(f"cannot read checkpoint metadata {path}: "
                                                      f"{type(e).__name__}: {e}"))
                    raise errors[-1] from e
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
                try:
                    obj = torch.load(value, map_location="cpu", weights_only=True)
                except pickle.UnpicklingError as e:
                    errors.append(UnsafeCheckpointError(f"refusing to load item {read_item.dest_index.fqn!r} of "
                                                        f"checkpoint {folder}: {str(e).strip().splitlines()[-1]}"))
                    raise errors[-1] from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    try:
        dcp.load(state, storage_reader=SafeReader(folder), planner=SafePlanner())
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if errors and not isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise errors[0] from None
        raise
