"""Generation metrics (FID, IS, KID, precision/recall) through torch-fidelity, and the in-training FID hook."""
from .features import (INCEPTION_FILE, INCEPTION_NAME, TINY_NAME, TinyFeatureExtractor, create_extractor,
                       default_layer, register_extractor, resolve_inception_weights)
from .hook import DistributedEvalError, agree_on_success, evaluate_fid, save_sample_grid
from .metrics import (METRICS, compute_metrics, extract_features, format_record, frechet_distance,
                      inception_score, kid, make_records, precision_recall, reference_features, save_statistics,
                      statistics, write_records)

__all__ = ["INCEPTION_FILE", "INCEPTION_NAME", "TINY_NAME", "TinyFeatureExtractor", "create_extractor",
           "default_layer", "register_extractor", "resolve_inception_weights", "DistributedEvalError",
           "agree_on_success", "evaluate_fid", "save_sample_grid", "METRICS",
           "compute_metrics", "extract_features", "format_record", "frechet_distance", "inception_score", "kid",
           "make_records", "precision_recall", "reference_features", "save_statistics", "statistics",
           "write_records"]
