"""Models: masked latent autoencoder, DiT/SiT, latent ViT classifier, all behind one registry."""
from .dit import DiT, SiT
from .mae import MaskedAutoencoderViT
from .registry import create_model, list_models, model_family
from .vit import VisionTransformer

__all__ = ["DiT", "SiT", "MaskedAutoencoderViT", "VisionTransformer", "create_model", "list_models", "model_family"]
