"""usp_scale: distributed, throughput-oriented USP (masked latent pretraining -> DiT/SiT/ViT)."""
__version__ = "0.1.0"
