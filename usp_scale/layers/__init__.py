"""Building blocks shared by the models; each function here is the readable torch reference."""
from .adaln import gated_residual, layernorm_modulate, modulate
from .attention import KERNELS, Attention, attention_kernel, attention_reference
from .loss import masked_mse, norm_pix_loss, normalize_target
from .masking import draw_mask, gather_tokens, masking_indices, num_kept, random_masking, unshuffle_with_mask_tokens
from .mlp import DropPath, Mlp, drop_path
from .patch import PatchEmbed, patchify, unpatchify
from .pos_embed import fill_sincos_, resample_grid, sincos_1d, sincos_2d
