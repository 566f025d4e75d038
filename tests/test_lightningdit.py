"""LightningDiT against the readable reference of tests/_helpers_lightning.py (explicit RMSNorm, SwiGLU, softmax
attention, RoPE as a complex rotation by angles computed position by position), outputs and gradients, awkward
shapes, per-dtype tolerances; the released checkpoint format (train.py's {"model", "ema", "opt", "config"}) loads
strictly; wrong checkpoints and RoPE tables are refused naming the keys."""
import copy

import pytest
import torch

from usp_scale.layers import attention as A
from usp_scale.layers.rmsnorm import RMSNorm
from usp_scale.layers.rope import VisionRotaryEmbedding, apply_rope, rope_angles
from usp_scale.layers.swiglu import SwiGLUFFN, swiglu_hidden
from usp_scale.models import create_model
from usp_scale.models.lightningdit import LightningDiT
from usp_scale.transfer.formats import load_weights, read_state_dict


from _helpers_lightning import ref_angles, ref_forward, ref_rmsnorm, ref_rotate


def _awkward(seed=0, **kw):
    """Width 100, 5 heads of 20 (RoPE: 5 frequencies per axis), SwiGLU hidden int(266.67) = 266, patch 2 on
    12 x 12 latents of 6 channels (36 tokens), every parameter off its zero init."""
    torch.manual_seed(seed)
    m = LightningDiT(input_size=12, patch_size=2, in_channels=6, hidden_size=100, depth=2, num_heads=5,
                     num_classes=7, **kw)
    with torch.no_grad():
        for n, prm in m.named_parameters():
            if prm.requires_grad:
                prm.add_(0.05 * torch.randn_like(prm))
    return m


def _inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, 12, 12, generator=g), torch.rand(n, generator=g), torch.randint(0, 7, (n,), generator=g)


# ----------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rmsnorm_swiglu_rope_against_references(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 20, generator=g).to(dtype)
    norm = RMSNorm(20).to(dtype)
    with torch.no_grad():
        norm.weight.add_(torch.randn(20, generator=g).to(dtype))
    torch.testing.assert_close(norm(x), ref_rmsnorm(x, norm.weight), atol=tol, rtol=tol)
    assert swiglu_hidden(1152) == 3072 and swiglu_hidden(1024) == 2730 and swiglu_hidden(100) == 266
    ffn = SwiGLUFFN(20, swiglu_hidden(20)).to(dtype)
    gate, up = (x @ ffn.w12.weight.T + ffn.w12.bias).split(swiglu_hidden(20), dim=-1)
    ref = (gate * torch.sigmoid(gate) * up) @ ffn.w3.weight.T + ffn.w3.bias
    torch.testing.assert_close(ffn(x), ref, atol=4 * tol, rtol=4 * tol)
    # RoPE on (B, N, H, d) of a 3x3 grid with head dim 12 (3 frequencies per axis); its tables are fp32 by
    # definition (EVA's arithmetic, the released checkpoints' buffers): fp32 precision at best
    q = torch.randn(2, 9, 4, 12, generator=g).to(dtype)
    rope = VisionRotaryEmbedding(12, 3)
    ref = ref_rotate(q.transpose(1, 2), ref_angles(3, 12)).transpose(1, 2)
    torch.testing.assert_close(rope(q), ref, atol=max(tol, 1e-6), rtol=max(tol, 1e-6))
    torch.testing.assert_close(rope_angles(12, 3).double(), ref_angles(3, 12), atol=1e-6, rtol=0)
    # the kept tokens of an MAE: rows of the table by position
    pos = torch.tensor([[4, 0, 8], [2, 7, 5]])
    kept = torch.gather(q, 1, pos[:, :, None, None].expand(-1, -1, 4, 12))
    torch.testing.assert_close(rope(kept, positions=pos), torch.gather(ref, 1, pos[:, :, None, None].expand(
        -1, -1, 4, 12)), atol=max(tol, 1e-6), rtol=max(tol, 1e-6))
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_angles(10, 3)


def test_rope_gradient_is_the_transposed_rotation():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 9, 2, 12, dtype=torch.float64, generator=g, requires_grad=True)
    ang = torch.randn(9, 1, 12, dtype=torch.float64, generator=g).repeat_interleave(1, 0)
    ang[..., 1::2] = ang[..., ::2]   # pairs share an angle
    up = torch.randn(1, 9, 2, 12, dtype=torch.float64, generator=g)
    (apply_rope(x, (ang.cos(), ang.sin())) * up).sum().backward()
    # rotating by -angle is the transpose (inverse) of the rotation
    torch.testing.assert_close(x.grad, apply_rope(up, (ang.cos(), -ang.sin())))


# ----------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("kw", [{}, {"use_qknorm": True, "wo_shift": True}])
def test_forward_and_gradients_equal_the_reference(kw):
    """The model in fp32 against the reference evaluated in fp64 on a copy of the same weights."""
    m = _awkward(**kw).eval()
    exact = copy.deepcopy(m).double()
    x, t, y = _inputs()
    out = m(x, t, y)
    ref = ref_forward(exact, x.double(), t.double(), y)
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    g_out = torch.autograd.grad((out * w).sum(), [p for _, p in named])
    g_ref = torch.autograd.grad((ref * w.double()).sum(), [dict(exact.named_parameters())[n] for n, _ in named])
    for (n, _), a, b in zip(named, g_out, g_ref):
        torch.testing.assert_close(a, b.float(), atol=1e-5 * (1 + b.abs().max().item()), rtol=1e-4, msg=n)


def test_fp32_bf16_and_the_attention_backends():
    m = _awkward().eval()
    x, t, y = _inputs()
    with torch.no_grad():
        ref = ref_forward(copy.deepcopy(m).double(), x.double(), t.double(), y).float()
        explicit_m = copy.deepcopy(m)
        assert A.set_attention_backend(explicit_m, "reference") > 0
        explicit = explicit_m(x, t, y)
        fused = m(x, t, y)     # SDPA
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = m(x, t, y)
    torch.testing.assert_close(explicit, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=1e-5)
    assert ((half.float() - ref).abs().max() / ref.abs().max()) < 3e-2


def test_registry_sizes_and_released_key_layout():
    # parameter counts of hustvl/LightningDiT's models at 16x16x32 latents (pos_embed included), and its keys
    xl = create_model("LightningDiT-XL/1", device="meta")
    assert sum(p.numel() for p in xl.parameters()) == 675_256_736
    keys = set(xl.state_dict())
    assert {"feat_rope.freqs_cos", "feat_rope.freqs_sin", "pos_embed", "blocks.27.mlp.w12.weight",
            "blocks.27.mlp.w3.bias", "blocks.0.norm1.weight", "final_layer.norm_final.weight",
            "blocks.0.adaLN_modulation.1.weight", "y_embedder.embedding_table.weight"} <= keys
    assert xl.blocks[0].mlp.w12.weight.shape == (6144, 1152) and xl.feat_rope.freqs_cos.shape == (256, 72)
    assert not any("q_norm" in k for k in keys)
    for name, (d, depth) in {"LightningDiT-B/2": (768, 12), "LightningDiT-L/1": (1024, 24),
                             "LightningDiT-1p0B/1": (1536, 24), "LightningDiT-1p6B/2": (1792, 28)}.items():
        m = create_model(name, device="meta")
        assert (m.hidden_size, m.depth) == (d, depth)
    with pytest.raises(ValueError, match="no learned sigma"):
        create_model("LightningDiT-tiny/1", learn_sigma=True)


def test_released_checkpoint_format_loads_strictly(tmp_path):
    """train.py saves {"model": (DDP) state_dict, "ema": state_dict, "opt": AdamW state, "config": yaml dict};
    inference.py takes "ema" (or a bare state dict). Both load strictly and give the same outputs."""
    src = create_model("LightningDiT-tiny/1")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = {k: v.clone() for k, v in src.state_dict().items()}
    opt = torch.optim.AdamW(src.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0)
    src(*_tiny_inputs()).square().mean().backward()
    opt.step()
    config = {"model": {"model_type": "LightningDiT-tiny/1", "use_swiglu": True, "use_rope": True},
              "optimizer": {"lr": 0.0002, "beta2": 0.95}, "transport": {"use_lognorm": True}}
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}, "ema": ema,
                "opt": opt.state_dict(), "config": config}, tmp_path / "0080000.pt")
    torch.save(ema, tmp_path / "bare.pt")
    for name, which in (("0080000.pt", "auto"), ("0080000.pt", "model"), ("bare.pt", "auto")):
        dst = create_model("LightningDiT-tiny/1")
        load_weights(dst, str(tmp_path / name), which=which)
        want = ema if which != "model" else src.state_dict()
        assert all(torch.equal(dst.state_dict()[k], want[k]) for k in want), (name, which)


def _tiny_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 32, 4, 4, generator=g), torch.rand(2, generator=g), torch.randint(0, 10, (2,), generator=g)


def test_wrong_checkpoints_and_rope_tables_are_refused_naming_keys(tmp_path):
    light = create_model("LightningDiT-tiny/1")
    torch.save({"ema": create_model("DiT-tiny/2").state_dict()}, tmp_path / "dit.pt")
    with pytest.raises(ValueError,
                       match=r"(?s)dit\.pt does not fit LightningDiT.*missing.*mlp\.w12.*unexpected.*mlp\.fc1"):
        load_weights(light, str(tmp_path / "dit.pt"))
    torch.save({"ema": light.state_dict()}, tmp_path / "light.pt")
    with pytest.raises(ValueError, match=r"(?s)light\.pt does not fit DiT.*missing.*mlp\.fc1.*unexpected.*mlp\.w12"):
        load_weights(create_model("DiT-tiny/2", input_size=4), str(tmp_path / "light.pt"))
    # a table of the same shape made for another grid (EVA's ft_seq_len != pt_seq_len) or of another shape
    sd = read_state_dict(str(tmp_path / "light.pt"))
    sd["feat_rope.freqs_cos"] = VisionRotaryEmbedding(32, 4, pt_grid=8).freqs_cos
    with pytest.raises(RuntimeError, match=r"feat_rope\.freqs_cos: the RoPE table differs from the one of a 4x4 grid"):
        light.load_state_dict(sd)
    sd["feat_rope.freqs_cos"] = VisionRotaryEmbedding(32, 5).freqs_cos
    with pytest.raises(RuntimeError, match=r"feat_rope\.freqs_cos: a RoPE table of shape \(25, 32\)"):
        light.load_state_dict(sd)
