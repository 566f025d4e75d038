"""Moved to :mod:`usp_scale.cluster.slurm`. Running or importing this old path fails with a message naming the new
one (no alias: a batch script that still calls it should be updated, not keep working by accident)."""
import sys

_MSG = ("usp_scale.engine.slurm moved to usp_scale.cluster.slurm: run `python -m usp_scale.cluster.slurm ...` "
        "(see launchers/slurm/*.sbatch) and import from usp_scale.cluster.slurm")
if __name__ == "__main__":
    sys.exit(_MSG)
raise ImportError(_MSG)
