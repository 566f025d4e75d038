"""Cluster launch helpers for launchers/slurm/*.sbatch and multi-node runs: SLURM node lists (:mod:`.hosts`) and the
batch-job wrapper, hostfiles and ``.deepspeed_env`` (:mod:`.slurm`, ``python -m usp_scale.cluster.slurm``).

Library code: the launchers call it, it imports no launcher, no torch and nothing else of usp_scale but
:mod:`usp_scale.fileio`, so a batch script's helper calls start in a fraction of a second.
"""
