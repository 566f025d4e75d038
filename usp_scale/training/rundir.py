"""The run folder at start-up (rank 0, before anything is written into it): one job per folder, writable, no litter.

* :func:`lock_run_dir`: an exclusive ``fcntl.flock`` on ``<output_dir>/.lock`` (the OS releases it when the process
  dies, however it dies); a second job on the same folder is refused naming the holder's host and pid. The lock is
  re-entrant within one process (a test running several trainers in turn) and released by :func:`unlock_run_dir`.
* :func:`check_writable`: the run folder and its checkpoint folder take a file now, not at the first save.
* :func:`clean_litter`: the temporary files (``*.tmp<pid>``) of writers killed mid-write whose process is gone, and
  step folders left incomplete by a kill during pruning (older than the newest complete checkpoint).
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import time

from .. import runtime as D
from ..config import ConfigError, save_config
from ..fileio import remove_stale_temps

LOCK_NAME = ".lock"
_HELD: dict = {}  # realpath of the lock file -> open file object (the flock lives as long as it is open)


class RunDirLockedError(ConfigError):
    """Another job holds the run folder."""


def lock_run_dir(output_dir: str) -> str:
    """Take the exclusive lock of ``output_dir`` (created if needed); returns the lock file's path."""
    path = os.path.realpath(os.path.join(output_dir, LOCK_NAME))
    if path in _HELD:
        return path
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown (it has not written its host and pid yet)"
        f.close()
        raise RunDirLockedError(f"output_dir={output_dir} is in use by another job ({holder}; lock {path}): two jobs "
                                "on one run folder would resume each other's live checkpoints and mix their metrics. "
                                "Wait for it to end, stop it, or give this job another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _HELD[path] = f
    return path


def unlock_run_dir(output_dir: str) -> None:
    f = _HELD.pop(os.path.realpath(os.path.join(output_dir, LOCK_NAME)), None)
    if f is not None:
        f.close()  # closing the last descriptor releases the flock


def check_writable(*folders: str) -> None:
    """Create each folder and write (then remove) a probe file in it; a folder that takes no file is a
    :class:`ConfigError` naming it, at start-up rather than at the first checkpoint."""
    for folder in folders:
        probe = os.path.join(folder, f".write-test{os.getpid()}")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f"{folder} is not writable ({type(e).__name__}: {e.strerror or e}): this job writes "
                              "its checkpoints, metrics and exports there; fix its permissions or choose another "
                              "output_dir") from None


STEP_RE = re.compile(r"^step_(\d+)$")


def clean_litter(output_dir: str, checkpoint_dir: str) -> list:
    """Remove what killed writers of this run folder left (rank 0, holding the lock): temporary files of dead
    processes, and step folders without ``meta.json`` older than the newest complete one (a kill during pruning).
    Returns the removed paths (printed)."""
    removed = remove_stale_temps(output_dir)
    if os.path.isdir(checkpoint_dir):
        steps = {}
        for n in os.listdir(checkpoint_dir):
            if n.startswith((".tmp-step_", ".old-step_")):  # a save or a pruning that was killed
                shutil.rmtree(os.path.join(checkpoint_dir, n), ignore_errors=True)
                removed.append(os.path.join(checkpoint_dir, n))
            m = STEP_RE.match(n)
            if m:
                steps[int(m.group(1))] = (os.path.join(checkpoint_dir, n),
                                          os.path.isfile(os.path.join(checkpoint_dir, n, "meta.json")))
        complete = [s for s, (_, ok) in steps.items() if ok]
        newest = max(complete) if complete else None
        for s, (path, ok) in sorted(steps.items()):
            if not ok and newest is not None and s < newest:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    for p in removed:
        print(f"[usp_scale] removed {p} (left by a writer killed mid-write)", flush=True)
    return removed


def prepare_run_dir(output_dir: str, is_main: bool) -> None:
    """Collective, at start-up: rank 0 locks ``output_dir`` (a second job is refused naming the holder), checks that
    it and its checkpoint folder are writable and removes the litter of killed writers; every rank raises rank 0's
    error."""
    error = None
    if is_main:
        ckpt = os.path.join(output_dir, "checkpoints")
        try:
            check_writable(output_dir)
            lock_run_dir(output_dir)
            check_writable(ckpt)
            clean_litter(output_dir, ckpt)
        except ConfigError as e:
            error = (isinstance(e, RunDirLockedError), str(e))
    error = D.broadcast_object(error)
    if error is not None:
        raise (RunDirLockedError if error[0] else ConfigError)(error[1])


def accept_run(cfg, is_main: bool) -> None:
    """The run is accepted (its resume checks passed): rank 0 writes its resolved config to
    ``<output_dir>/config.yaml`` only now, so a refused run leaves the previous run's config in place."""
    if is_main:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
