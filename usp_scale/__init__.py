"""usp_scale: distributed, throughput-oriented USP (masked latent pretraining -> DiT/SiT/ViT).

The package's floors, what each package owns and where new things go: docs/architecture.md.

Importing this package imports nothing but the standard library (``python -m usp_scale.cluster.slurm`` runs on a
login node without torch). It installs one import hook, :class:`_MovedModules`: a module path that moved fails with a
message naming the new one (no alias: code that still uses an old path should be updated, not keep working by
accident).
"""
import importlib.abc
import sys

__version__ = "0.1.0"

# old module path -> where it lives now
MOVED = {
    "usp_scale.engine.slurm": "usp_scale.cluster.slurm: run `python -m usp_scale.cluster.slurm ...` (see "
                              "launchers/slurm/*.sbatch) and import from usp_scale.cluster.slurm",
    "usp_scale.engine.dist": "usp_scale.runtime (init_runtime; the launcher environment in usp_scale.runtime.env, "
                             "the process group and collectives in usp_scale.runtime.group)",
    "usp_scale.engine.deepspeed_engine": "usp_scale.engine.deepspeed (DeepSpeedEngine in usp_scale.engine.deepspeed."
                                         "engine, the JSON in usp_scale.engine.deepspeed.config)",
    "usp_scale.eval.agree": "usp_scale.runtime (agree_on_success, DistributedEvalError)",
    "usp_scale.training.startup": "usp_scale.config.resolve (resolve_job); TF32 is applied by "
                                  "usp_scale.runtime.init_runtime",
}


class _MovedModules(importlib.abc.MetaPathFinder):
    """Refuses the module paths of :data:`MOVED`, naming the new one."""

    def find_spec(self, name, path=None, target=None):
        if name in MOVED:
            raise ModuleNotFoundError(f"{name} moved to {MOVED[name]}", name=name)
        return None


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
