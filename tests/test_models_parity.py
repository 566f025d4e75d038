"""The models compute what the official code computes, checked against small explicit references."""
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usp_scale.layers.pos_embed import sincos_2d
from usp_scale.models import create_model

torch.backends.cuda.matmul.allow_tf32 = False


# ----------------------------------------------------------------------------- explicit references
def ref_sincos(D, G, cls=False):
    """Loop over the grid: first half of channels from the column, second half from the row."""
    out = np.zeros((G * G, D))
    q = D // 4
    for r in range(G):
        for c in range(G):
            for k in range(q):
                w = 1.0 / 10000 ** (k / q)
                out[r * G + c, k] = math.sin(c * w)
                out[r * G + c, q + k] = math.cos(c * w)
                out[r * G + c, 2 * q + k] = math.sin(r * w)
                out[r * G + c, 3 * q + k] = math.cos(r * w)
    if cls:
        out = np.concatenate([np.zeros((1, D)), out])
    return out


def ref_patchify(x, p):
    N, C, H, W = x.shape
    return torch.einsum("nchpwq->nhwpqc", x.reshape(N, C, H // p, p, W // p, p)).reshape(N, -1, p * p * C)


def ref_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    B, N, C = x.shape
    d = C // heads
    qkv = x @ qkv_w.T + qkv_b
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    outs = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        a = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
        outs.append(a @ vh)
    return torch.cat(outs, -1) @ proj_w.T + proj_b


def ref_ln(x, w=None, b=None):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + 1e-6)
    return y if w is None else y * w + b


def ref_vit_block(x, sd, pre, heads, gelu="none"):
    g = lambda n: sd[pre + n]
    x = x + ref_attention(ref_ln(x, g("norm1.weight"), g("norm1.bias")), g("attn.qkv.weight"), g("attn.qkv.bias"),
                          g("attn.proj.weight"), g("attn.proj.bias"), heads)
    h = ref_ln(x, g("norm2.weight"), g("norm2.bias")) @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
    h = F.gelu(h, approximate=gelu)
    return x + h @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")


def ref_mae_forward(model, latents, noise, ratio):
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    p = model.patch_size
    N = latents.shape[0]
    L = model.num_patches
    keep = int(L * (1 - ratio))
    patches_cqp = latents.reshape(N, latents.shape[1], L ** 0 * (latents.shape[2] // p), p, latents.shape[3] // p, p)
    # conv patch embedding as an explicit (c, pi, qi)-ordered matmul
    w = sd["patch_embed.proj.weight"].reshape(sd["patch_embed.proj.weight"].shape[0], -1)
    pt = torch.einsum("nchpwq->nhwcpq", patches_cqp).reshape(N, L, -1)
    x = pt @ w.T + sd["patch_embed.proj.bias"] + sd["pos_embed"][:, 1:]
    # loop-based masking: keep the `keep` tokens with the smallest noise, in increasing-noise order
    kept, mask = [], torch.ones(N, L)
    order = []
    for n in range(N):
        idx = sorted(range(L), key=lambda j: (noise[n, j].item(), j))
        order.append(idx)
        kept.append(torch.stack([x[n, j] for j in idx[:keep]]))
        for j in idx[:keep]:
            mask[n, j] = 0
    x = torch.stack(kept)
    cls = sd["cls_token"] + sd["pos_embed"][:, :1]
    x = torch.cat([cls.expand(N, -1, -1), x], 1)
    depth = len(model.blocks)
    heads = model.blocks[0].attn.num_heads
    for i in range(depth):
        x = ref_vit_block(x, sd, f"blocks.{i}.", heads)
    x = ref_ln(x, sd["norm.weight"], sd["norm.bias"])
    x = x @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    Dd = x.shape[-1]
    full = torch.zeros(N, L + 1, Dd)
    for n in range(N):
        full[n, 0] = x[n, 0]
        for r, j in enumerate(order[n]):
            full[n, j + 1] = x[n, 1 + r] if r < keep else sd["mask_token"][0, 0]
    x = full + sd["decoder_pos_embed"]
    dheads = model.decoder_blocks[0].attn.num_heads
    for i in range(len(model.decoder_blocks)):
        x = ref_vit_block(x, sd, f"decoder_blocks.{i}.", dheads)
    x = ref_ln(x, sd["decoder_norm.weight"], sd["decoder_norm.bias"])
    pred = (x @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"])[:, 1:]
    target = ref_patchify(latents, p)
    if model.norm_pix_loss:
        dims = (-2, -1) if model.norm_image else (-1,)
        mean = target.mean(dims, keepdim=True)
        var = target.var(dims, keepdim=True, unbiased=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_tok = ((pred - target) ** 2).mean(-1)
    loss = (per_tok * mask).sum() / mask.sum()
    return loss, pred, mask


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("D,G", [(16, 3), (128, 14), (1152, 2)])
def test_sincos_table_matches_loop_reference(D, G):
    np.testing.assert_allclose(sincos_2d(D, G, cls_token=True), ref_sincos(D, G, cls=True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm_pix,norm_image", [(True, False), (False, False), (True, True)])
def test_mae_forward_matches_explicit_reference(norm_pix, norm_image):
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch_vae", norm_pix_loss=norm_pix, norm_image=norm_image, kernels="torch").eval()
    latents = torch.randn(3, 4, 28, 28)
    noise = torch.rand(3, 196)
    loss, pred, mask = model(latents, mask_ratio=0.75, noise=noise)
    rloss, rpred, rmask = ref_mae_forward(model, latents, noise, 0.75)
    assert mask.sum(1).tolist() == [147.0] * 3
    torch.testing.assert_close(mask, rmask)
    torch.testing.assert_close(pred, rpred, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-5)


def test_mae_noise_fixes_the_mask_and_other_ratios():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch_vae", kernels="torch")
    x = torch.randn(2, 4, 28, 28)
    noise = torch.rand(2, 196)
    _, p1, m1 = model(x, noise=noise)
    _, p2, m2 = model(x, noise=noise)
    assert torch.equal(m1, m2) and torch.equal(p1, p2)
    _, _, m3 = model(x, mask_ratio=0.5)
    assert m3.sum(1).tolist() == [98.0, 98.0]
    with pytest.raises(ValueError, match="noise must have shape"):
        model(x, noise=torch.rand(2, 195))


def test_mae_patch4_variant_and_16_channels():
    m = create_model("vit_tiny_patch_vae_2", in_chans=16, img_size=28)
    loss, pred, mask = m(torch.randn(2, 16, 28, 28))
    assert pred.shape == (2, 49, 4 * 4 * 16) and mask.shape == (2, 49) and torch.isfinite(loss)


def test_encoder_block_matches_timm_block():
    from timm.models.vision_transformer import Block as TimmBlock

    torch.manual_seed(0)
    ours = create_model("vit_tiny_patch_vae").blocks[0]
    theirs = TimmBlock(128, 4, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 50, 128)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_classifier_matches_timm_vision_transformer(pool):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    ours = create_model("vit_tiny_patch16_vae", num_classes=7, global_pool=pool).eval()
    theirs = TimmViT(img_size=28, patch_size=2, in_chans=4, num_classes=7, embed_dim=128, depth=2, num_heads=4,
                     mlp_ratio=4, qkv_bias=True, global_pool=pool,
                     norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # identical keys and shapes
    x = torch.randn(3, 4, 28, 28)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_linprobe_head_is_batchnorm_without_affine():
    m = create_model("vit_tiny_patch16_vae", num_classes=5, global_pool="token", linprobe=True)
    keys = set(m.state_dict())
    assert {"head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias", "norm.weight"} <= keys
    assert "head.0.weight" not in keys and "fc_norm.weight" not in keys
    assert m(torch.randn(4, 4, 28, 28)).shape == (4, 5)


def test_layer_ids_for_layer_decay():
    m = create_model("vit_tiny_patch16_vae")
    assert m.layer_id("cls_token") == 0 and m.layer_id("patch_embed.proj.weight") == 0
    assert m.layer_id("blocks.1.mlp.fc1.weight") == 2 and m.layer_id("head.weight") == 3
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}


def ref_timestep_embedding(t, dim=256):
    half = dim // 2
    out = torch.zeros(len(t), dim)
    for i, tv in enumerate(t.tolist()):
        for k in range(half):
            f = math.exp(-math.log(10000) * k / half)
            out[i, k] = math.cos(tv * f)
            out[i, half + k] = math.sin(tv * f)
    return out


def ref_dit_forward(model, x, t, y):
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    p, N = model.patch_size, x.shape[0]
    w = sd["x_embedder.proj.weight"].reshape(sd["x_embedder.proj.weight"].shape[0], -1)
    G = x.shape[-1] // p
    pt = torch.einsum("nchpwq->nhwcpq", x.reshape(N, x.shape[1], G, p, G, p)).reshape(N, G * G, -1)
    h = pt @ w.T + sd["x_embedder.proj.bias"] + sd["pos_embed"]
    te = ref_timestep_embedding(t.float())
    te = F.silu(te @ sd["t_embedder.mlp.0.weight"].T + sd["t_embedder.mlp.0.bias"])
    te = te @ sd["t_embedder.mlp.2.weight"].T + sd["t_embedder.mlp.2.bias"]
    c = te + sd["y_embedder.embedding_table.weight"][y]
    heads = model.num_heads
    for i in range(len(model.blocks)):
        g = lambda n: sd[f"blocks.{i}.{n}"]
        mod = F.silu(c) @ g("adaLN_modulation.1.weight").T + g("adaLN_modulation.1.bias")
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
        aff = model.vae_simple
        n1 = ref_ln(h, g("norm1.weight"), g("norm1.bias")) if aff else ref_ln(h)
        n1 = n1 * (1 + sc1[:, None]) + sh1[:, None]
        h = h + g1[:, None] * ref_attention(n1, g("attn.qkv.weight"), g("attn.qkv.bias"), g("attn.proj.weight"),
                                            g("attn.proj.bias"), heads)
        n2 = ref_ln(h, g("norm2.weight"), g("norm2.bias")) if aff else ref_ln(h)
        n2 = n2 * (1 + sc2[:, None]) + sh2[:, None]
        m = F.gelu(n2 @ g("mlp.fc1.weight").T + g("mlp.fc1.bias"), approximate="tanh")
        h = h + g2[:, None] * (m @ g("mlp.fc2.weight").T + g("mlp.fc2.bias"))
    mod = F.silu(c) @ sd["final_layer.adaLN_modulation.1.weight"].T + sd["final_layer.adaLN_modulation.1.bias"]
    sh, sc = mod.chunk(2, dim=1)
    h = ref_ln(h) * (1 + sc[:, None]) + sh[:, None]
    h = h @ sd["final_layer.linear.weight"].T + sd["final_layer.linear.bias"]
    oc = model.out_channels
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(N, G, G, p, p, oc)).reshape(N, oc, G * p, G * p)
    return h


def _randomize_(model):
    """The official init zeroes adaLN and the final layer; randomise so that every path is exercised."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.requires_grad:
                prm.copy_(torch.randn_like(prm) * 0.05 + (1.0 if name.endswith("norm1.weight") else 0.0))


@pytest.mark.parametrize("name", ["DiT-tiny/2", "DiT-tiny/2-VAE-simple", "SiT-tiny/2-VAE-simple"])
def test_dit_forward_matches_explicit_reference(name):
    model = create_model(name, kernels="torch").eval()
    _randomize_(model)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999]) if name.startswith("DiT") else torch.tensor([0.0, 0.3, 0.99])
    y = torch.tensor([1, 5, 10])  # 10 = the null class of the 10-class tiny model
    out = model(x, t, y)
    ref = ref_dit_forward(model, x, t, y)
    if name.startswith("SiT"):
        ref = ref[:, :4]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_dit_at_init_outputs_zero_and_keeps_tables_frozen():
    m = create_model("DiT-tiny/2-VAE-simple")
    out = m(torch.randn(2, 4, 8, 8), torch.tensor([3, 4]), torch.tensor([0, 1]))
    assert torch.count_nonzero(out) == 0
    assert not m.pos_embed.requires_grad
    assert all(torch.count_nonzero(b.adaLN_modulation[1].weight) == 0 for b in m.blocks)
    assert torch.count_nonzero(m.x_embedder.proj.bias) == 0
    assert m.blocks[0].norm1.weight is not None and create_model("DiT-tiny/2").blocks[0].norm1.weight is None


def test_mae_init_follows_the_official_code():
    torch.manual_seed(0)
    m = create_model("vit_base_patch_vae")
    b = m.patch_embed.proj.bias
    # PyTorch's default conv bias init U(+-1/sqrt(C p^2)) = U(+-0.25) is kept, not zeroed
    assert torch.count_nonzero(b) == b.numel() and b.abs().max() <= 0.25
    qkv = m.blocks[0].attn.qkv.weight  # xavier-uniform over the fused (3D, D) matrix
    bound = math.sqrt(6.0 / (768 + 3 * 768))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.95 * bound
    assert torch.count_nonzero(m.blocks[0].attn.qkv.bias) == 0
    assert 0.015 < m.mask_token.std() < 0.025 and not m.pos_embed.requires_grad
    torch.testing.assert_close(m.pos_embed[0].double(), torch.from_numpy(ref_sincos(768, 14, cls=True)),
                               rtol=0, atol=1e-7)


def test_label_dropout_and_null_class():
    m = create_model("DiT-tiny/2")
    emb = m.y_embedder
    y = torch.tensor([1, 2, 3])
    dropped = emb(y, train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(dropped[0], emb.embedding_table.weight[10])
    torch.testing.assert_close(dropped[1], emb.embedding_table.weight[2])
    emb.dropout_prob = 1.0
    assert torch.equal(emb(y, train=True), emb.embedding_table.weight[[10, 10, 10]])


def _official_forward_with_cfg(model, x, t, y, cfg_scale):
    """The official DiT ``forward_with_cfg``: batch = [cond half; uncond half], guides output channels 0-2."""
    half = x[: len(x) // 2]
    model_out = model(torch.cat([half, half], dim=0), t, y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def test_cfg_channels_3_is_the_official_forward_with_cfg():
    """One CFG implementation (usp_scale.sample.CFGModel, switched by eval.cfg_channels / --cfg-channels):
    cfg_channels=3 reproduces the official forward_with_cfg on a real DiT."""
    from usp_scale.sample import make_model_fn

    m = create_model("DiT-tiny/2").eval()
    _randomize_(m)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.tensor([1, 2])
    with torch.no_grad():
        off = _official_forward_with_cfg(m, x.repeat(2, 1, 1, 1), t.repeat(2), torch.cat([y, torch.tensor([10, 10])]),
                                         4.0)[:2]
        ours = make_model_fn(m, num_classes=10, cfg_scale=4.0, cfg_channels=3)(x, t, y)
        allc = make_model_fn(m, num_classes=10, cfg_scale=4.0, cfg_channels=0)(x, t, y)
    torch.testing.assert_close(ours, off, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(allc[:, 3], off[:, 3])  # 0 = every latent channel guided: channel 3 differs
    assert not hasattr(m, "forward_with_cfg")        # no second implementation inside the model


@pytest.mark.parametrize("heads,width", [(16, 1152), (12, 768), (4, 128)])  # head dims 72, 64, 32
def test_attention_head_dims(heads, width):
    from usp_scale.models.dit import DiT

    m = DiT(input_size=4, patch_size=2, hidden_size=width, depth=1, num_heads=heads, num_classes=3).eval()
    _randomize_(m)
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([1, 2]), torch.tensor([0, 1])
    torch.testing.assert_close(m(x, t, y), ref_dit_forward(m, x, t, y), rtol=1e-4, atol=1e-4)
