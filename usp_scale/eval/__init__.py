"""Generation metrics (FID, sFID, IS, KID, precision/recall) under the ADM or torch-fidelity protocol, the
Inception network and its TF graph, and in-training FID (``hook``).

The names load lazily: ``from usp_scale.eval import FIDHook`` needs no torch-fidelity (the optional ``eval``
extra); the metrics and feature extractors (its adapter modules) import it when first used.
"""
import importlib

_WHERE = {
    **dict.fromkeys(("INCEPTION_FILE", "INCEPTION_NAME", "PROTOCOLS", "TINY_NAME", "TinyFeatureExtractor",
                     "create_extractor", "default_layer", "load_inception_weights", "register_extractor",
                     "resolve_inception_weights"), "features"),
    **dict.fromkeys(("FIDHook", "build_extractor", "build_fid_hook", "check_eval_config", "evaluate_fid",
                     "save_sample_grid", "truncate_eval_records"), "hook"),
    **dict.fromkeys(("METRICS", "compute_metrics", "extract_features", "format_adm", "format_record",
                     "frechet_distance", "inception_score", "kid", "make_records", "precision_recall",
                     "reference_features", "resolve_protocol", "save_statistics", "statistics", "write_records"),
                    "metrics"),
    **dict.fromkeys(("MetricInputError",), "adm"),
    **dict.fromkeys(("Inception2015",), "inception"),
    **dict.fromkeys(("convert_graph", "write_test_graph"), "inception_graph"),
}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'usp_scale.eval' has no attribute {name!r}")
