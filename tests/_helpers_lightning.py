"""Readable references for tests/test_lightningdit.py and tests/test_lightning_mae.py: LightningDiT's layers and
forward written out step by step from a model's tensors (explicit RMSNorm, softmax attention, SwiGLU, RoPE as a
complex rotation by angles computed position by position)."""
import math

import torch
import torch.nn.functional as F


def ref_rmsnorm(x, w, eps=1e-6):
    xf = x.double() if x.dtype == torch.float64 else x.float()
    return (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def ref_angles(grid, head_dim, theta=10000.0):
    """Angle of channel j of token (r, c): the first half of the channels rotates with the row, the second with
    the column; channel pairs (2k, 2k+1) of a half share the frequency theta^(-2k / half)."""
    half = head_dim // 2
    ang = torch.zeros(grid * grid, head_dim, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            for k in range(half // 2):
                w = theta ** (-2 * k / half)
                ang[r * grid + c, 2 * k: 2 * k + 2] = r * w
                ang[r * grid + c, half + 2 * k: half + 2 * k + 2] = c * w
    return ang


def ref_rotate(x, ang):
    """x (..., N, d) rotated pair by pair as complex numbers (x_2k + i x_2k+1) * exp(i angle_2k)."""
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    rot = torch.polar(torch.ones_like(ang[..., ::2]), ang[..., ::2])
    return torch.view_as_real(z * rot).flatten(-2).to(x.dtype)


def ref_forward(m, x, t, y):
    """LightningDiT's forward from m's tensors, every step written out (RoPE from angles computed here)."""
    P = dict(m.named_parameters())
    P.update(dict(m.named_buffers()))
    N, C, H, W = x.shape
    p, D, heads = m.patch_size, m.hidden_size, m.num_heads
    G, dh = H // p, m.hidden_size // m.num_heads
    lin = lambda v, name: v @ P[name + ".weight"].T + P[name + ".bias"]  # noqa: E731
    # patch embedding as a matmul over (c, p, q) patches, token = row * G + col
    patches = x.reshape(N, C, G, p, G, p).permute(0, 2, 4, 1, 3, 5).reshape(N, G * G, C * p * p)
    h = patches @ P["x_embedder.proj.weight"].reshape(D, -1).T + P["x_embedder.proj.bias"] + P["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=t.dtype) / half)
    tf = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    c = lin(F.silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2") + P["y_embedder.embedding_table.weight"][y]
    ang = ref_angles(G, dh) if m.use_rope else None
    for i in range(m.depth):
        b = f"blocks.{i}."
        mod = lin(F.silu(c), b + "adaLN_modulation.1")
        if m.wo_shift:
            sc1, g1, sc2, g2 = mod.chunk(4, dim=1)
            sh1 = sh2 = torch.zeros_like(sc1)
        else:
            sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
        a = ref_rmsnorm(h, P[b + "norm1.weight"]) * (1 + sc1[:, None]) + sh1[:, None]
        h = h + g1[:, None] * ref_attention(a, P, b + "attn", heads, ang)
        a = ref_rmsnorm(h, P[b + "norm2.weight"]) * (1 + sc2[:, None]) + sh2[:, None]
        gate, up = lin(a, b + "mlp.w12").chunk(2, dim=-1)
        h = h + g2[:, None] * lin(F.silu(gate) * up, b + "mlp.w3")
    sh, sc = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = ref_rmsnorm(h, P["final_layer.norm_final.weight"]) * (1 + sc[:, None]) + sh[:, None]
    out = lin(h, "final_layer.linear")
    return out.reshape(N, G, G, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, H, W)


def ref_attention(a, P, name, heads, ang=None):
    """Multi-head softmax attention of a (N, T, D) with the qkv/proj of ``name``; q/k norms when present; RoPE by
    the angles ``ang`` ((T, d), or (N, 1, T, d) per sample)."""
    N, T, D = a.shape
    dh = D // heads
    qkv = a @ P[name + ".qkv.weight"].T + P[name + ".qkv.bias"]
    q, k, v = qkv.reshape(N, T, 3, heads, dh).permute(2, 0, 3, 1, 4)                    # (N, heads, T, dh)
    if name + ".q_norm.weight" in P:
        q, k = ref_rmsnorm(q, P[name + ".q_norm.weight"]), ref_rmsnorm(k, P[name + ".k_norm.weight"])
    if ang is not None:
        q, k = ref_rotate(q, ang), ref_rotate(k, ang)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v
    return att.transpose(1, 2).reshape(N, T, D) @ P[name + ".proj.weight"].T + P[name + ".proj.bias"]


def ref_mae(m, x, noise, mask_ratio=0.75):
    """LightningMAE's (loss, pred, mask) from m's tensors: argsort-of-noise masking, LightningDiT blocks without
    adaLN on the kept tokens (each rotated by its own grid position), USP's ViT decoder, the masked MSE."""
    P = dict(m.named_parameters())
    P.update(dict(m.named_buffers()))
    N, C, H, W = x.shape
    p, D = m.patch_size, m.embed_dim
    G = H // p
    L, heads = G * G, m.blocks[0].attn.num_heads
    lin = lambda v, name: v @ P[name + ".weight"].T + P[name + ".bias"]  # noqa: E731
    patches = x.reshape(N, C, G, p, G, p).permute(0, 2, 4, 1, 3, 5).reshape(N, L, C * p * p)
    h = patches @ P["patch_embed.proj.weight"].reshape(D, -1).T + P["patch_embed.proj.bias"] + P["pos_embed"]
    keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    h = torch.stack([h[n, ids_keep[n]] for n in range(N)])                              # (N, K, D)
    ang = ref_angles(G, D // heads)[ids_keep].unsqueeze(1)                              # (N, 1, K, dh)
    for i in range(len(m.blocks)):
        b = f"blocks.{i}."
        h = h + ref_attention(ref_rmsnorm(h, P[b + "norm1.weight"]), P, b + "attn", heads, ang)
        gate, up = lin(ref_rmsnorm(h, P[b + "norm2.weight"]), b + "mlp.w12").chunk(2, dim=-1)
        h = h + lin(F.silu(gate) * up, b + "mlp.w3")
    h = ref_rmsnorm(h, P["norm.weight"])
    d = lin(h, "decoder_embed")
    full = P["mask_token"].expand(N, L, d.shape[-1]).clone()
    for n in range(N):
        full[n, ids_keep[n]] = d[n]
    h = full + P["decoder_pos_embed"]
    ln = lambda v, name: F.layer_norm(v, v.shape[-1:], P[name + ".weight"], P[name + ".bias"], 1e-6)  # noqa: E731
    for i in range(len(m.decoder_blocks)):
        b = f"decoder_blocks.{i}."
        h = h + ref_attention(ln(h, b + "norm1"), P, b + "attn", m.decoder_blocks[i].attn.num_heads)
        h = h + lin(F.gelu(lin(ln(h, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    pred = lin(ln(h, "decoder_norm"), "decoder_pred")
    target = x.reshape(N, C, G, p, G, p).permute(0, 2, 4, 3, 5, 1).reshape(N, L, p * p * C)  # (p, q, c) order
    if m.norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.ones(N, L, dtype=x.dtype)
    for n in range(N):
        mask[n, ids_keep[n]] = 0
    loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    return loss, pred, mask
