"""The trainer's side of the stop/requeue protocol (docs/training.md, "Preemption and requeue"; the batch-job side
and the protocol's names are :mod:`usp_scale.cluster.slurm`'s).

Touching ``<output_dir>/STOP_AND_CHECKPOINT`` (the SLURM scripts do it on SIGUSR1), or SIGUSR1/SIGTERM delivered to
the workers, makes the trainer checkpoint at its next log step (or at the end of the epoch) and exit; a second SIGTERM
before that ends the process at once (:class:`StopRequests`); the launcher then
exits with ``EXIT_STOPPED`` and rank 0 leaves ``<output_dir>/STOPPED`` (:func:`write_stopped`), which the next run
removes at start-up (:func:`clear_stale_stop_files`).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from .. import runtime as D
from ..cluster.slurm import EXIT_STOPPED, STOP_FILE, STOPPED_FILE

_IMPORTED_AT = time.time()
EXIT_DONE = 0  # training finished, or stopped on request under a torchrun agent with restarts left


class StopRequests:
    """A signal (SIGUSR1/SIGTERM, to this rank) or the stop file (seen by rank 0) asks the run to checkpoint and
    stop. :attr:`raw` is this rank's own request; :meth:`agreed` is collective (a signal may reach only some ranks;
    the checkpoint that follows is collective)."""

    def __init__(self, output_dir: str, is_main: bool):
        self.path = os.path.join(output_dir, STOP_FILE)
        self.is_main = is_main
        self.raw = False
        self.honoured = False  # a request was honoured (a checkpoint written): the run stops

    def install(self) -> None:
        def handler(signum, frame):
            if self.raw and signum == signal.SIGTERM:  # a second SIGTERM: the first was not acted on yet, end now
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            self.raw = True

        for s in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(s, handler)
            except ValueError:  # not in the main thread
                pass
        self._watch_deepspeed_runner()

    def _watch_deepspeed_runner(self, interval: float = 1.0) -> None:
        """Under DeepSpeed's launcher (``deepspeed`` runner -> ``deepspeed.launcher.launch`` -> this rank), a SIGTERM
        or Ctrl-C to the runner of a single-node job ends the runner alone (it forwards no signal there), leaving
        launch.py and the ranks training as orphans. A daemon thread watches launch.py: when its parent (the
        runner) is gone, or launch.py itself, the rank takes it as a stop request (checkpoint, exit 75)."""
        parent = os.getppid()
        if "deepspeed.launcher.launch" not in _cmdline(parent):
            return
        runner = _ppid(parent)

        def watch():
            while not self.raw:
                if os.getppid() != parent or _ppid(parent) != runner:
                    print(f"[usp_scale] rank stop: DeepSpeed's runner (pid {runner}) or launcher (pid {parent}) has "
                          "ended; checkpointing and exiting", file=sys.stderr, flush=True)
                    self.raw = True
                    return
                time.sleep(interval)

        threading.Thread(target=watch, name="usp_scale-deepspeed-runner-watch", daemon=True).start()

    def agreed(self) -> bool:
        """Collective (at log steps): any rank's signal, or the stop file."""
        req = self.raw or (self.is_main and os.path.exists(self.path))
        return bool(D.all_reduce_max(float(req)))

    def at_epoch_end(self, world: int) -> bool:
        """At an epoch boundary (collective with more than one rank): a signal or the stop file, so that a request
        is honoured even when no step ran (between epochs, or an epoch that yielded no batch)."""
        if world > 1:
            return self.agreed()
        return self.raw or (self.is_main and os.path.exists(self.path))

    def consume(self) -> bool:
        """The request was honoured (checkpoint written): rank 0 removes the stop file. Returns True (stop)."""
        if self.is_main and os.path.exists(self.path):
            os.remove(self.path)
        self.honoured = True
        return True


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    """The parent of ``pid`` (-1 when ``pid`` is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def run_started_at() -> float:
    """When this run started, in epoch seconds: ``$USP_SCALE_STARTED_AT`` (the SLURM scripts export the job's
    start) or this process's start (from /proc; the module's import time elsewhere)."""
    if os.environ.get("USP_SCALE_STARTED_AT"):
        return float(os.environ["USP_SCALE_STARTED_AT"])
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])   # field 22: start time in clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


def clear_stale_stop_files(output_dir: str) -> None:
    """Rank 0 at start-up: remove the previous run's STOPPED marker, and a STOP_AND_CHECKPOINT older than this
    run (left by a job killed before it could act on it), which would otherwise stop this run at its first
    log step. A stop file written after the run started (e.g. by the SLURM script's signal trap) is kept."""
    started = run_started_at()
    for name in (STOPPED_FILE, STOP_FILE):
        path = os.path.join(output_dir, name)
        try:
            mtime = os.path.getmtime(path)
        except OSError:
            continue
        if name == STOPPED_FILE or mtime < started:
            os.remove(path)
            print(f"[usp_scale] removed {path} (written {time.ctime(mtime)}, before this run started "
                  f"{time.ctime(started)})", flush=True)


def stop_exit_code() -> int:
    """EXIT_STOPPED, except under a torchrun agent with restarts left: it would restart the workers on a non-zero
    exit (they would resume and train on, ignoring the stop), so there the stop exits 0 and STOPPED tells."""
    left = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - int(os.environ.get("TORCHELASTIC_RESTART_COUNT",
                                                                                       "0"))
    return EXIT_DONE if left > 0 else EXIT_STOPPED


def write_stopped(output_dir: str, result: dict, code: int) -> str:
    """Rank 0 after a requested stop: the STOPPED marker (step, checkpoint, exit code), the one sign of a requested
    stop that survives torchrun (which reports any failed worker as exit code 1)."""
    path = os.path.join(output_dir, STOPPED_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({"step": result["step"], "checkpoint": result["checkpoint"], "exit_code": code,
                   "time": time.time()}, f)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path
