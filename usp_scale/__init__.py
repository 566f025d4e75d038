"""usp_scale: distributed, throughput-oriented USP (masked latent pretraining -> DiT/SiT/ViT).

The package's floors, what each package owns and where new things go: docs/architecture.md.

Importing this package imports nothing but the standard library (``python -m usp_scale.cluster.slurm`` runs on a
login node without torch). It installs one import hook, :class:`_Layout`:

* a module path that moved fails with a message naming the new one (:data:`MOVED`; no alias: code that still uses an
  old path should be updated, not keep working by accident);
* in a source checkout (no ``usp_scale/kernels`` beside this file), ``usp_scale.kernels`` is the repository's
  top-level ``kernels/`` folder, as ``setup.py``'s ``package_dir`` installs it.
"""
import importlib.abc
import importlib.util
import os
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
    "usp_scale.training.logging": "usp_scale.training.metrics (MetricsLogger; truncate_jsonl is usp_scale.fileio's)",
    "usp_scale.vae.latent_cache": "usp_scale.data.cache_format (beside its writer, data.cache_writer, and reader, "
                                  "data.cache_reader)",
    "usp_scale.data.latents": "usp_scale.data.cache_reader (LatentCache, LatentCacheLoader; the format is "
                              "usp_scale.data.cache_format)",
}

_HERE = os.path.dirname(os.path.abspath(__file__))
# The kernels' folder of a source checkout (None when installed: then usp_scale/kernels is a subpackage).
_SOURCE_KERNELS = None if os.path.isdir(os.path.join(_HERE, "kernels")) else os.path.join(os.path.dirname(_HERE),
                                                                                            "kernels")


class _Layout(importlib.abc.MetaPathFinder):
    """Refuses the module paths of :data:`MOVED`, naming the new one; in a source checkout finds
    ``usp_scale.kernels`` in the top-level ``kernels/`` folder."""

    def find_spec(self, name, path=None, target=None):
        if name in MOVED:
            raise ModuleNotFoundError(f"{name} moved to {MOVED[name]}", name=name)
        if name == "usp_scale.kernels" and _SOURCE_KERNELS and os.path.isfile(os.path.join(_SOURCE_KERNELS,
                                                                                          "__init__.py")):
            return importlib.util.spec_from_file_location(name, os.path.join(_SOURCE_KERNELS, "__init__.py"),
                                                          submodule_search_locations=[_SOURCE_KERNELS])
        return None


if not any(type(f).__name__ == "_Layout" for f in sys.meta_path):
    sys.meta_path.insert(0, _Layout())
