"""Weight formats and MAE -> DiT/SiT/ViT transfer."""
from .core import TransferError, TransferReport, load_pretrained, mae_to_dit, mae_to_vit, transfer
from .formats import diff_keys, load_weights, read_state_dict

__all__ = ["TransferError", "TransferReport", "load_pretrained", "mae_to_dit", "mae_to_vit", "transfer",
           "diff_keys", "load_weights", "read_state_dict"]
