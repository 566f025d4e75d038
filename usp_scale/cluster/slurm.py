"""SLURM and multi-node launch helpers for launchers/slurm/*.sbatch (library code the launchers call; no torch import, no ``scontrol`` needed
except to requeue).

    python -m usp_scale.cluster.slurm head                       # first host of SLURM_JOB_NODELIST
    python -m usp_scale.cluster.slurm hosts                      # all hosts, one per line
    python -m usp_scale.cluster.slurm hostfile --slots 8 FILE    # DeepSpeed hostfile from the node list
    python -m usp_scale.cluster.slurm dry-run -- CMD ...         # print the command each node would run
    python -m usp_scale.cluster.slurm run --output-dir DIR -- CMD ...   # the batch script's body (requeue logic)
    python -m usp_scale.cluster.slurm deepspeed-env [VAR ...]    # .deepspeed_env lines for deepspeed --hostfile

The stop/requeue protocol shared with the trainer (docs/training.md, "Preemption and requeue"):
``<output_dir>/STOP_AND_CHECKPOINT`` asks the trainer to checkpoint at its next log step and stop; it then
exits with :data:`EXIT_STOPPED` and leaves ``<output_dir>/STOPPED``; ``run`` requeues the job on either.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from ..fileio import write_text
from .hosts import expand_slurm_nodelist

STOP_FILE = "STOP_AND_CHECKPOINT"  # = usp_scale.training.trainer.STOP_FILE
STOPPED_FILE = "STOPPED"           # written by rank 0 on a requested stop, removed when the next run starts
EXIT_STOPPED = 75                  # a requested stop, checkpointed: not finished (EX_TEMPFAIL: "try again")

# What the ranks need from the launching shell that DeepSpeed's pdsh launcher does not forward by itself (it
# forwards only PYTHON*, MLFLOW*, MV2*, UCX* and, on CUDA, NCCL*): prefixes, then exact names.
DEEPSPEED_ENV_PREFIXES = ("OMP_", "MKL_", "HF_", "TRANSFORMERS_", "TORCH_", "TORCHINDUCTOR_", "TRITON_", "NCCL_",
                          "GLOO_", "USP_SCALE_", "DS_ACCELERATOR", "DS_BUILD_")
DEEPSPEED_ENV_NAMES = ("CUDA_HOME", "LD_LIBRARY_PATH", "PATH")


def hosts(env=None) -> list:
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SystemExit("SLURM_JOB_NODELIST is not set: run inside an allocation (sbatch/salloc), or set it "
                         "for a dry run, e.g. SLURM_JOB_NODELIST='gpu[01-02]'")
    return expand_slurm_nodelist(nodelist)


def write_hostfile(path: str, slots: int, env=None) -> str:
    return write_text(path, "".join(f"{h} slots={slots}\n" for h in hosts(env)))


def dry_run_lines(cmd: list, env=None) -> list:
    """One line per node: the host, its node rank and the exact command srun would start there."""
    env = os.environ if env is None else env
    lines = []
    for i, h in enumerate(hosts(env)):
        lines.append(f"[node {i} {h}] SLURM_NODEID={i} SLURM_PROCID={i} {shlex.join(cmd)}")
    return lines


def _log(msg: str) -> None:
    print(f"[usp_scale] {msg}", flush=True)


def run_job(cmd: list, output_dir: str, env=None, requeue_cmd=("scontrol", "requeue")) -> int:
    """Run ``cmd`` (srun ... / deepspeed ...) as the body of a batch job and return the job's exit code.

    1. Remove ``STOP_AND_CHECKPOINT`` and ``STOPPED`` left by an earlier job that was killed before the trainer
       acted on them, and export ``USP_SCALE_STARTED_AT`` (stop files written later belong to this job).
    2. SIGUSR1 (``#SBATCH --signal=B:USR1@300`` before the time limit, ``scancel --signal=USR1 --batch``)
       touches ``STOP_AND_CHECKPOINT``: the trainer checkpoints at its next log step and exits.
    3. When the job was signalled, or the trainer stopped on request (exit code 75 or ``STOPPED``: torchrun
       turns a worker's 75 into 1), requeue the job (``scontrol requeue $SLURM_JOB_ID``) and return 75.
       Otherwise return ``cmd``'s exit code (128 + N when a signal N killed it).
    """
    env = dict(os.environ if env is None else env)
    os.makedirs(output_dir, exist_ok=True)
    stop, stopped = os.path.join(output_dir, STOP_FILE), os.path.join(output_dir, STOPPED_FILE)
    for path in (stop, stopped):
        if os.path.exists(path):
            os.remove(path)
            _log(f"removed {path} left by an earlier job")
    env["USP_SCALE_STARTED_AT"] = repr(time.time())
    signalled = []

    def on_usr1(signum, frame):
        _log(f"SIGUSR1: asking the trainer to checkpoint and stop ({stop})")
        with open(stop, "a"):
            pass
        signalled.append(time.time())

    previous = signal.signal(signal.SIGUSR1, on_usr1)
    try:
        proc = subprocess.Popen(cmd, env=env)
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    rc = 128 - rc if rc < 0 else rc
    if not (signalled or rc == EXIT_STOPPED or os.path.exists(stopped)):
        _log(f"{cmd[0]} exited with code {rc}")
        return rc
    why = "SIGUSR1" if signalled else "the trainer stopped on request"
    detail = open(stopped).read().strip() if os.path.exists(stopped) else "no STOPPED marker"
    job = env.get("SLURM_JOB_ID")
    if not job:
        _log(f"{why} ({detail}); not in a SLURM job, so nothing to requeue")
        return EXIT_STOPPED
    _log(f"{why} ({detail}): requeueing job {job}")
    r = subprocess.run([*requeue_cmd, job], env=env)
    if r.returncode:
        _log(f"{shlex.join([*requeue_cmd, job])} failed with exit code {r.returncode}")
    return EXIT_STOPPED


def deepspeed_env_lines(names=(), env=None) -> list:
    """``NAME=value`` lines for a ``.deepspeed_env`` file: the variables of :data:`DEEPSPEED_ENV_PREFIXES` /
    :data:`DEEPSPEED_ENV_NAMES` that are set, plus ``names`` (which must be set). DeepSpeed pastes each value
    into a remote shell command, so values with quotes, ``$``, backslashes or newlines are refused."""
    env = os.environ if env is None else env
    missing = [n for n in names if n not in env]
    if missing:
        raise SystemExit(f"deepspeed-env: {', '.join(missing)} not set in this shell; export them first")
    keys = [k for k in sorted(env) if k.startswith(DEEPSPEED_ENV_PREFIXES) or k in DEEPSPEED_ENV_NAMES]
    keys += [n for n in names if n not in keys]
    bad = [k for k in keys if re.search(r"[\"'`$\\\n]", env[k])]
    if bad:
        raise SystemExit(f"deepspeed-env: the values of {', '.join(bad)} contain quotes, $, backslashes or "
                         "newlines, which DeepSpeed's remote command would mangle; simplify them")
    return [f"{k}={env[k]}" for k in keys if k != "DS_ENV_FILE"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m usp_scale.cluster.slurm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("head", help="print the first host of the allocation (rendezvous / master address)")
    sub.add_parser("hosts", help="print every host of the allocation")
    hf = sub.add_parser("hostfile", help="write a DeepSpeed hostfile for the allocation")
    hf.add_argument("--slots", type=int, required=True, help="GPUs per node")
    hf.add_argument("path", help="output file")
    dr = sub.add_parser("dry-run", help="print the command each node would run")
    dr.add_argument("command", nargs=argparse.REMAINDER, help="the per-node command (after --)")
    rn = sub.add_parser("run", help="run the job's launcher: clear stale stop files, checkpoint on SIGUSR1, "
                                    "requeue on a requested stop (exit code 75)", description=run_job.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    rn.add_argument("--output-dir", required=True, help="the run's output_dir (where the stop files live)")
    rn.add_argument("command", nargs=argparse.REMAINDER, help="the launcher command (after --)")
    de = sub.add_parser("deepspeed-env", help="print (or --out: write) .deepspeed_env lines for deepspeed "
                                              "--hostfile over pdsh/ssh")
    de.add_argument("names", nargs="*", metavar="VAR", help="more variables to forward (must be set)")
    de.add_argument("--out", default="", help="write this file (e.g. .deepspeed_env in the launch directory, or "
                                              "any path named by DS_ENV_FILE) instead of printing")
    a = ap.parse_args(argv)
    if a.cmd == "head":
        print(hosts()[0])
    elif a.cmd == "hosts":
        print("\n".join(hosts()))
    elif a.cmd == "hostfile":
        print(write_hostfile(a.path, a.slots))
    elif a.cmd == "deepspeed-env":
        text = "".join(line + "\n" for line in deepspeed_env_lines(a.names))
        if a.out:
            write_text(a.out, text)
        else:
            sys.stdout.write(text)
    else:
        cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
        if a.cmd == "dry-run":
            print("\n".join(dry_run_lines(cmd)))
        elif not cmd:
            ap.error("run: give the launcher command after --")
        else:
            return run_job(cmd, a.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
