"""Writing files so that a crash or a full disk never leaves a partial one: the project's one way to write.

Every writer goes through :func:`atomic_write`: the content is written to ``<path>.tmp<pid>`` in the same folder
(so the rename stays on one file system), flushed and fsynced, then renamed over ``path`` with ``os.replace``
(atomic on POSIX), and the folder is fsynced so the rename itself survives a power cut. On any failure the
temporary file is removed and ``path`` keeps its old content (or stays absent); a full disk is re-raised as
:class:`DiskFullError` naming the path, the space needed and the space free.

On top of it: :func:`write_bytes`, :func:`write_text`, :func:`write_json`, :func:`torch_save` and
:func:`save_safetensors` (model-only weights, with the tensors' sha256 in the metadata under
:data:`CONTENT_KEY`; ``usp_scale.checkpoint.safe_load.read_safetensors`` checks it).

A leaf module: it imports nothing else from usp_scale (torch and safetensors only when a tensor is written).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from typing import Callable, Optional

CONTENT_KEY = "usp_scale_sha256"  # safetensors metadata: sha256 of the tensors (names, dtypes, shapes, bytes)


class DiskFullError(OSError):
    """A write that failed because the file system is full; names the path and the space needed."""


# --------------------------------------------------------------------------- litter of killed writers

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temps(folder: str, names: Optional[tuple] = None) -> list:
    """Remove the ``<name>.tmp<pid>`` files under ``folder`` (recursively; with ``names``, only those of these file
    names, in ``folder`` itself) that :func:`atomic_write` left when its process was killed mid-write (the process
    is gone on this host). Returns the removed paths."""
    pattern = re.compile(r"\.tmp(\d+)$")
    removed = []
    walk = [(folder, [], os.listdir(folder) if os.path.isdir(folder) else [])] if names else os.walk(folder)
    for root, _, files in walk:
        for name in files:
            if names and name[:name.rfind(".tmp")] not in names:
                continue
            m = pattern.search(name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                path = os.path.join(root, name)
                try:
                    os.remove(path)
                    removed.append(path)
                except OSError:
                    pass
    return removed


# --------------------------------------------------------------------------- disk-full detection

def _existing_folder(path: str) -> str:
    folder = os.path.abspath(path)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return folder


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
        return shutil.disk_usage(_existing_folder(path)).free < max(needed or 0, 1 << 20)
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
    folder = _existing_folder(os.path.dirname(os.path.abspath(path)) or ".")
    free = shutil.disk_usage(folder).free
    need = f"about {_human(needed)}" if needed else "more than is free"
    err = DiskFullError(errno.ENOSPC, f"disk full: writing {path} needs {need}; the file system of {folder} had "
                                      f"{_human(free)} free when the write failed{note}. Free space or choose another "
                                      "output folder; nothing partial was left behind", path)
    err.__cause__ = exc
    return err


# --------------------------------------------------------------------------- the one atomic write

def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_umask() -> int:
    """This process's umask, read without changing it where the OS says it (Linux ``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way is to set it and put it back
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open()`` under this process's umask (``0o666 & ~umask``: -rw-r--r-- under the
    usual 022, group-writable under 002)."""
    return 0o666 & ~process_umask()


@contextlib.contextmanager
def atomic_write(path: str, needed: Optional[int] = None):
    """Yield a temporary path next to ``path`` for the caller to write; when the block succeeds the file is
    given the umask's mode (:func:`file_mode`), fsynced and renamed to ``path`` (and the folder fsynced). On any
    failure the temporary file is removed and the error re-raised; a full disk becomes :class:`DiskFullError`
    (``needed``: the bytes the write needs, for the message).

    The mode: some writers create their file private (the safetensors library: -rw-------), which a colleague on
    shared storage cannot read; every artifact written here follows the umask, as ``open()`` and ``torch.save`` do."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        full = not isinstance(e, (KeyboardInterrupt, SystemExit)) and is_disk_full(e, tmp, needed)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if full:
            raise disk_full_error(path, needed, e) from e
        raise
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened and fsynced
        _fsync_path(folder)


def write_with(path: str, write: Callable[[str], None], needed: Optional[int] = None) -> str:
    """``write(tmp_path)`` through :func:`atomic_write` (for writers that take a file name: PIL, numpy, ...)."""
    with atomic_write(path, needed=needed) as tmp:
        write(tmp)
    return path


def write_bytes(path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_write(path, needed=len(data)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def write_text(path: str, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj, indent: Optional[int] = 1, sort_keys: bool = False) -> str:
    """Write ``obj`` as JSON (one trailing newline) to ``path`` atomically; returns ``path``."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def truncate_jsonl(path: str, step: int) -> int:
    """Drop the JSON-lines records of ``path`` whose ``step`` is past ``step`` (records without one are kept)
    and a torn last line (a job killed mid-write); kept lines are unchanged; rewritten atomically. Returns
    #dropped (0 when the file does not exist). Used on resume for every JSONL file a run appends to, so a run
    resumed from an earlier checkpoint never holds two records for one step."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    keep = []
    for i, ln in enumerate(lines):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue  # torn write at the end
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e}); fix or remove that line and resume again") \
                from None
        if rec.get("step", 0) <= step:
            keep.append(ln)
    if len(keep) != len(lines):
        write_text(path, "".join(ln + "\n" for ln in keep))
    return len(lines) - len(keep)


# --------------------------------------------------------------------------- tensors

def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside nested dicts/lists/tuples (an estimate of a ``torch.save``'s size)."""
    import torch

    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """The sha256 (hex) of a file's bytes, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of the file layout)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def torch_save(obj, path: str) -> str:
    """``torch.save`` through :func:`atomic_write` (a full disk names the path and the bytes needed)."""
    import torch

    with atomic_write(path, needed=tensor_bytes(obj)) as tmp:
        torch.save(obj, tmp)
    return path


def save_safetensors(model_or_sd, path: str, metadata: Optional[dict] = None) -> str:
    """Write a model's (or a state dict's) tensors to a .safetensors file atomically; returns ``path``.

    Tensors are detached, copied to the CPU and made contiguous; ``metadata`` values are stored as strings,
    plus :data:`CONTENT_KEY` = :func:`tensors_sha256` of the tensors. A full disk raises :class:`DiskFullError`
    and leaves no partial file."""
    from safetensors.torch import save_file

    sd = model_or_sd.state_dict() if hasattr(model_or_sd, "state_dict") else model_or_sd
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    meta = {**{k: str(v) for k, v in (metadata or {}).items()}, CONTENT_KEY: tensors_sha256(tensors)}
    with atomic_write(path, needed=tensor_bytes(tensors)) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path
