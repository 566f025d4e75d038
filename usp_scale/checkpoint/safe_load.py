"""Reading and writing weight files without running code from them, and with errors that name the file.

* :func:`torch_load` is the only way the project reads a ``torch.save`` file: ``torch.load(weights_only=True)``
  with an explicit allowlist (:data:`ALLOWED_GLOBALS`: ``argparse.Namespace``, which the official MAE, USP and
  DiT/SiT checkpoints keep under ``"args"``). Tensors, plain containers (dict, list, tuple, set), numbers,
  strings, ``torch.Size``/dtypes/devices load as usual; a file that needs any other Python object is refused
  with :class:`UnsafeCheckpointError`, naming the file and every type it wanted. Nothing in the file runs.
* :func:`read_safetensors` / :func:`read_json` read those formats and turn every reader failure (truncated,
  overwritten, not that format) into :class:`CheckpointFileError` naming the file.
* Writing goes through :mod:`usp_scale.fileio` (atomic, fsynced; a full disk is ``DiskFullError``).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from typing import Iterable

import torch

from ..fileio import CONTENT_KEY, tensors_sha256, write_text

# What the official checkpoints hold besides tensors and plain containers.
ALLOWED_GLOBALS = (argparse.Namespace,)


class CheckpointFileError(RuntimeError):
    """A weight, checkpoint or manifest file that cannot be read (truncated, damaged, wrong format)."""


class UnsafeCheckpointError(CheckpointFileError):
    """A ``torch.save`` file that needs Python objects outside the allowlist (loading it would run code)."""


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


class NonFiniteWeightsError(CheckpointFileError):
    """A weight file holding NaN or infinity (written by a diverged run or another tool)."""


def check_finite(tensors, path: str, *, what: str = "weights file") -> None:
    """Refuse weights holding NaN/inf, naming ``path`` and the first bad key (in the file's key order) with how many
    of its values are bad. Called once where weights are read (:func:`usp_scale.transfer.formats.read_state_dict`,
    the VAE and teacher readers): NaN weights would sample black images that still score a finite FID, or train
    NaN steps that blame the learning rate."""
    for key, t in tensors.items():
        if isinstance(t, dict):  # a nested checkpoint ({"state_dict": {...}}): its keys with the dotted prefix
            check_finite({f"{key}.{k}": v for k, v in t.items()}, path, what=what)
        elif isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                kinds = [n for n, m in (("NaN", torch.isnan(t)), ("inf", torch.isinf(t))) if bool(m.any())]
                raise NonFiniteWeightsError(
                    f"refusing {what} {path}: tensor '{key}' holds {bad} non-finite value(s) ({'/'.join(kinds)}) of "
                    f"{t.numel()} (the first bad key in the file); the weights come from a diverged run or a broken "
                    "conversion: use an earlier checkpoint or export")


def weights_content_id(path: str) -> str:
    """What identifies a weight file's content: the tensors' sha256 an export of this project carries in its
    metadata (``"tensors:<sha256>"``, read from the header only), else the sha256 of the file's bytes
    (``"file:<sha256>"``). Results made from the file (samples) record it, so a file replaced at the same path is
    noticed."""
    import hashlib

    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 - not readable: hash the bytes (the reader names the file later)
            meta = {}
        if CONTENT_KEY in meta:
            return "tensors:" + meta[CONTENT_KEY]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return "file:" + h.hexdigest()


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


# --------------------------------------------------------------------------- self-checked JSON and file checksums

def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def write_checked_json(path: str, obj: dict, key: str = "self_sha256") -> dict:
    """Write ``obj`` plus ``key`` = sha256 of its canonical JSON (atomically, fsynced); returns what was written.

    :func:`read_checked_json` recomputes the hash, so any change to the file's content is detected."""
    import hashlib

    body = json.loads(_canonical({k: v for k, v in obj.items() if k != key}))
    out = {**body, key: hashlib.sha256(_canonical(body)).hexdigest()}
    write_text(path, json.dumps(out, indent=1))
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
