"""SLURM helpers for launchers/slurm/*.sbatch (no ``scontrol`` needed).

    python -m usp_scale.engine.slurm head                       # first host of SLURM_JOB_NODELIST
    python -m usp_scale.engine.slurm hosts                      # all hosts, one per line
    python -m usp_scale.engine.slurm hostfile --slots 8 FILE    # DeepSpeed hostfile from the node list
    python -m usp_scale.engine.slurm dry-run -- CMD ...         # print the command each node would run
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from .hosts import expand_slurm_nodelist


def hosts(env=None) -> list:
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SystemExit("SLURM_JOB_NODELIST is not set: run inside an allocation (sbatch/salloc), or set it "
                         "for a dry run, e.g. SLURM_JOB_NODELIST='gpu[01-02]'")
    return expand_slurm_nodelist(nodelist)


def write_hostfile(path: str, slots: int, env=None) -> str:
    with open(path, "w") as f:
        for h in hosts(env):
            f.write(f"{h} slots={slots}\n")
    return path


def dry_run_lines(cmd: list, env=None) -> list:
    """One line per node: the host, its node rank and the exact command srun would start there."""
    env = os.environ if env is None else env
    lines = []
    for i, h in enumerate(hosts(env)):
        lines.append(f"[node {i} {h}] SLURM_NODEID={i} SLURM_PROCID={i} {shlex.join(cmd)}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m usp_scale.engine.slurm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("head", help="print the first host of the allocation (rendezvous / master address)")
    sub.add_parser("hosts", help="print every host of the allocation")
    hf = sub.add_parser("hostfile", help="write a DeepSpeed hostfile for the allocation")
    hf.add_argument("--slots", type=int, required=True, help="GPUs per node")
    hf.add_argument("path", help="output file")
    dr = sub.add_parser("dry-run", help="print the command each node would run")
    dr.add_argument("command", nargs=argparse.REMAINDER, help="the per-node command (after --)")
    a = ap.parse_args(argv)
    if a.cmd == "head":
        print(hosts()[0])
    elif a.cmd == "hosts":
        print("\n".join(hosts()))
    elif a.cmd == "hostfile":
        print(write_hostfile(a.path, a.slots))
    else:
        cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
        print("\n".join(dry_run_lines(cmd)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
