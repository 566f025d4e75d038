"""Sampling: CFG wrapper, samplers over a model callable, VAE decoding and sharded, resumable sampling."""
from .cfg import CFGModel
from .io import make_decoder, make_grid, read_npz_images, read_png, to_uint8, write_npz, write_png
from .samplers import KINDS, Sampler, build_sampler
from .sharded import IndexedNoise, assemble_npz, derive_seed, generate_batches, run_sampling

__all__ = ["CFGModel", "make_decoder", "make_grid", "read_npz_images", "read_png", "to_uint8", "write_npz",
           "write_png", "KINDS", "Sampler", "build_sampler", "IndexedNoise", "assemble_npz", "derive_seed",
           "generate_batches", "run_sampling"]
from .model_fn import infer_latent_shape, infer_num_classes, make_model_fn  # noqa: E402

__all__ += ["infer_latent_shape", "infer_num_classes", "make_model_fn"]
