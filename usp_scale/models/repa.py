"""REPA (representation alignment, Yu et al. 2025; reference code sihyun-yu/REPA): a DiT/SiT whose hidden state after
block ``encoder_depth`` goes through a small MLP per teacher, the **projector**, whose output is aligned with a frozen
teacher's patch tokens (the loss: :mod:`usp_scale.layers.projection_loss`; the teacher:
:mod:`usp_scale.models.teacher`). docs/method.md §9 has the equations and defaults.

Three models share one projector and one forward (:class:`_WithProjectors`); each returns ``(output, zs)`` with
``zs`` a list of (N, T, z_dim) projected tokens, one per teacher:

- :class:`REPASiT` -- REPA's own SiT (registry ``SiT-{B,L,XL}/2-REPA``): the project's SiT blocks with
  non-affine LayerNorms, **no learned sigma** (out channels = in channels), REPA's keywords ``encoder_depth``
  (1-indexed), ``z_dims``, ``projector_dim`` and ``qk_norm``, and REPA's state-dict keys and module order
  (``projectors`` registered between ``blocks`` and ``final_layer``, so keys and parameter order are REPA's).
  It keeps REPA's **time convention**: t = 0 is data, t = 1 noise, x_t = (1 - t) x + t eps, and the network
  predicts v = eps - x (REPA's loss.py ``interpolant``). The project's SiT runs the other way (t = 0 noise,
  v = x - eps); :data:`REPASiT.time_reversed` tells the sampler (usp_scale/sample/model_fn.py) to evaluate
  ``-model(x, 1 - t)``, which is the same vector field.
- :class:`SiTWithProjectors` -- the project's SiT (``SiT-*/2-VAE-simple-REPA`` for USP + REPA: the MAE transfers into
  the transformer as for any VAE-simple SiT, the projector starts fresh), project time convention, learned sigma
  computed and dropped as in SiT.
- :class:`DiTWithProjectors` -- **ours, not REPA's**: REPA is defined on SiT only; this is the DiT (DDPM loss) with the
  same projector, offered for comparison (``DiT-*/2-VAE-simple-REPA``).

The projector (REPA's ``build_mlp``): ``Linear(hidden, projector_dim) -> SiLU -> Linear(projector_dim,
projector_dim) -> SiLU -> Linear(projector_dim, z_dim)``, keys ``projectors.{i}.{0,2,4}.{weight,bias}``,
initialised as REPA's ``_basic_init`` does every Linear: xavier-uniform weights, zero biases.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers.attention import Attention
from .dit import DiT, SiT


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA's projector MLP, xavier-uniform weights and zero biases (REPA's init of every Linear)."""
    mlp = nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                        nn.Linear(projector_dim, z_dim))
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return mlp


def projector_macs(hidden_size: int, projector_dim: int, z_dims: Sequence[int], tokens: int) -> float:
    """Multiply-accumulates of the projectors on ``tokens`` tokens of one sample."""
    return float(sum(tokens * (hidden_size * projector_dim + projector_dim * projector_dim + projector_dim * z)
                     for z in z_dims))


class QKNormAttention(Attention):
    """REPA's ``--qk-norm`` (timm ``Attention(qk_norm=True)``): LayerNorm(head_dim, eps 1e-5, affine) on q and k
    per head before the attention; keys ``q_norm`` / ``k_norm``. Same kernels as :class:`Attention`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias)
        proj = self.proj
        del self.proj          # re-registered after the norms: timm's key and parameter order
        self.q_norm = nn.LayerNorm(self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim)
        self.proj = proj

    def transform_qkv(self, qkv: torch.Tensor, rope=None) -> torch.Tensor:
        """(B, N, 3, H, d) -> the same with q and k normalised per head; the module's kernel runs next."""
        if rope is not None:
            raise TypeError("REPA's attention applies no rotary embedding")
        q, k, v = qkv.unbind(2)                                                              # each (B, N, H, d)
        return torch.stack((self.q_norm(q), self.k_norm(k), v), dim=2)


class _WithProjectors:
    """The REPA head of a DiT/SiT: projectors after block ``encoder_depth`` (1-indexed), forward -> (out, zs)."""

    time_reversed = False      # True: REPA's time convention (see the module docstring)
    encoder_depth: int
    z_dims: Tuple[int, ...]
    projector_dim: int

    def _add_projectors(self, encoder_depth: int, z_dims: Sequence[int], projector_dim: int) -> None:
        depth = len(self.blocks)
        if not isinstance(encoder_depth, int) or not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth={encoder_depth!r}: the projector reads the output of block "
                             f"encoder_depth (1-indexed), so it must lie in 1..{depth} (the model's depth)")
        z_dims = tuple(int(z) for z in z_dims)
        if not z_dims or any(z < 1 for z in z_dims):
            raise ValueError(f"z_dims={list(z_dims)}: one positive teacher width per teacher (768 for DINOv2-B)")
        if projector_dim < 1:
            raise ValueError(f"projector_dim={projector_dim} must be positive (REPA: 2048)")
        self.encoder_depth, self.z_dims, self.projector_dim = encoder_depth, z_dims, int(projector_dim)
        # Registered between the blocks and the final layer, as REPA's SiT does: its keys, parameter order and
        # therefore the optimizer-state order of its checkpoints are ours too.
        final = self.final_layer
        del self.final_layer
        self.projectors = nn.ModuleList([build_projector(self.hidden_size, projector_dim, z) for z in z_dims])
        self.final_layer = final

    def forward_with_projections(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                                 force_drop_ids: Optional[torch.Tensor] = None
                                 ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(N, C, H, W), (N,), (N,) -> (N, out_channels, H, W) and [(N, T, z_dim)] per teacher."""
        x = self.x_embedder(x) + self.pos_embed                                      # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)   # (N, D)
        zs: List[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if i + 1 == self.encoder_depth:
                zs = [projector(x) for projector in self.projectors]                 # token-wise MLP
        x = self.final_layer(x, c)                                                   # (N, T, p*p*out)
        return self.unpatchify(x), zs

    def flops_per_sample(self) -> float:
        """Forward FLOPs of one sample: the DiT/SiT's and the projectors'."""
        return DiT.flops_per_sample(self) + 2.0 * projector_macs(self.hidden_size, self.projector_dim, self.z_dims,
                                                                 self.num_patches)


class DiTWithProjectors(_WithProjectors, DiT):
    """The project's DiT with REPA projectors -- ours, not REPA's (REPA defines the method on SiT only).
    forward -> (DiT output with the learned-sigma half, zs)."""

    def __init__(self, *, encoder_depth: int = 8, z_dims: Sequence[int] = (768,), projector_dim: int = 2048,
                 **kwargs):
        DiT.__init__(self, **kwargs)
        self._add_projectors(encoder_depth, z_dims, projector_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        return self.forward_with_projections(x, t, y, force_drop_ids)


class SiTWithProjectors(_WithProjectors, SiT):
    """The project's SiT with REPA projectors (USP + REPA); the project's time convention.
    forward -> (velocity, zs); with learn_sigma the sigma half is computed and dropped, as in SiT."""

    def __init__(self, *, encoder_depth: int = 8, z_dims: Sequence[int] = (768,), projector_dim: int = 2048,
                 **kwargs):
        SiT.__init__(self, **kwargs)
        self._add_projectors(encoder_depth, z_dims, projector_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        out, zs = self.forward_with_projections(x, t, y, force_drop_ids)
        if self.learn_sigma:
            out, _ = out.chunk(2, dim=1)
        return out, zs


class REPASiT(SiTWithProjectors):
    """REPA's SiT (sihyun-yu/REPA models/sit.py): keys, module order and numerics of the reference for the same
    weights; no learned sigma, non-affine block norms, REPA's time convention (t = 0 data; v = eps - x).

    REPA's keywords: ``encoder_depth`` (1-indexed, default 8), ``z_dims`` (default [768]), ``projector_dim``
    (2048), ``qk_norm`` (False). REPA's ``fused_attn`` is not a keyword here: the attention kernel is chosen for
    the model (``model.attn_backend``, :meth:`set_attn_backend`); its ``use_cfg``/``path_type``/``decoder_hidden_size`` are stored but
    unused there (the final layer is ``hidden_size`` wide in every REPA configuration)."""

    time_reversed = True

    def __init__(self, *, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, encoder_depth: int = 8, z_dims: Sequence[int] = (768,),
                 projector_dim: int = 2048, qk_norm: bool = False, kernels: str = "auto"):
        SiT.__init__(self, input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                     hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                     class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=False,
                     vae_simple=False, kernels=kernels)
        self.qk_norm = bool(qk_norm)
        if self.qk_norm:
            for block in self.blocks:   # timm's Attention(qk_norm=True), as REPA's SiTBlock builds it
                old = block.attn
                block.attn = QKNormAttention(hidden_size, num_heads, qkv_bias=True)
                with torch.no_grad():   # keep the initialised qkv/proj (xavier-uniform, zero bias)
                    block.attn.qkv.load_state_dict(old.qkv.state_dict())
                    block.attn.proj.load_state_dict(old.proj.state_dict())
        self._add_projectors(encoder_depth, z_dims, projector_dim)
