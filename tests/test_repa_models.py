"""REPA models (usp_scale/models/repa.py): REPA's SiT and the project's SiT/DiT with REPA's projector, against a
readable functional reference written here (REPA's models/sit.py spelled out), outputs and gradients, awkward
shapes, per-dtype tolerances; keys, sizes, FLOPs, the contract; the sampler path (zs dropped, REPA's time
convention) against REPA's Euler and Euler-Maruyama samplers written out here."""
import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from usp_scale.models import SiT, create_model, list_models, model_family
from usp_scale.models.repa import DiTWithProjectors, REPASiT, SiTWithProjectors
from usp_scale.sample import build_sampler, make_model_fn
from usp_scale.transport import create_transport

A = importlib.import_module("usp_scale.layers.attention")
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}


@pytest.fixture
def reference_attention():
    """Sets the explicit reference attention on a model's attention modules; returns the model."""
    def use(model):
        assert A.set_attention_backend(model, "reference") > 0
        return model
    return use


# ------------------------------------------------------------------------------------------- the reference
def _lin(sd, x, name):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _attention(sd, x, p, heads, qk_norm):
    N, T, D = x.shape
    d = D // heads
    q, k, v = _lin(sd, x, p + "qkv").reshape(N, T, 3, heads, d).permute(2, 0, 3, 1, 4)    # (N, H, T, d) each
    if qk_norm:   # timm Attention(qk_norm=True): LayerNorm(head_dim), eps 1e-5
        q = F.layer_norm(q, (d,), sd[p + "q_norm.weight"], sd[p + "q_norm.bias"], 1e-5)
        k = F.layer_norm(k, (d,), sd[p + "k_norm.weight"], sd[p + "k_norm.bias"], 1e-5)
    w = torch.softmax(q.float() @ k.float().transpose(-2, -1) / math.sqrt(d), dim=-1)
    o = (w @ v.float()).to(x.dtype).transpose(1, 2).reshape(N, T, D)
    return _lin(sd, o, p + "proj")


def reference_forward(sd, x, t, y, *, patch, heads, encoder_depth, out_channels, affine_norm=False, qk_norm=False):
    """REPA's SiT.forward (and the project's DiT/SiT with the tap) from a state dict: -> (out, zs)."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    n_proj = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("projectors.")), default=-1)
    N = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]                                       # (N, T, D)
    half = 128                                                                              # 256-wide frequencies
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    arg = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    c = _lin(sd, F.silu(_lin(sd, temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]

    def norm(z, p):
        w = sd.get(p + ".weight") if affine_norm else None
        b = sd.get(p + ".bias") if affine_norm else None
        return F.layer_norm(z, (z.shape[-1],), w, b, 1e-6)

    zs = []
    for i in range(depth):
        p = f"blocks.{i}."
        s1, g1, a1, s2, g2, a2 = _lin(sd, F.silu(c), p + "adaLN_modulation.1").chunk(6, dim=-1)
        h = h + a1[:, None] * _attention(sd, norm(h, p + "norm1") * (1 + g1[:, None]) + s1[:, None], p + "attn.",
                                         heads, qk_norm)
        m = norm(h, p + "norm2") * (1 + g2[:, None]) + s2[:, None]
        h = h + a2[:, None] * _lin(sd, F.gelu(_lin(sd, m, p + "mlp.fc1"), approximate="tanh"), p + "mlp.fc2")
        if i + 1 == encoder_depth:
            for j in range(n_proj):
                q = f"projectors.{j}."
                zs.append(_lin(sd, F.silu(_lin(sd, F.silu(_lin(sd, h, q + "0")), q + "2")), q + "4"))
    shift, scale = _lin(sd, F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    o = _lin(sd, F.layer_norm(h, (h.shape[-1],), None, None, 1e-6) * (1 + scale[:, None]) + shift[:, None],
             "final_layer.linear")
    g = int(round(o.shape[1] ** 0.5))
    o = o.reshape(N, g, g, patch, patch, out_channels)
    return torch.einsum("nhwpqc->nchpwq", o).reshape(N, out_channels, g * patch, g * patch), zs


def _perturb(model, seed=1, scale=0.05):
    """Move off the zero inits (adaLN-zero, final layer) so that every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


CASES = {
    # name: (constructor, forward kwargs of the reference)
    "repa-sit 5x5 grid, 2 teachers, tap at the last block, qk_norm": (
        lambda: REPASiT(input_size=10, patch_size=2, hidden_size=48, depth=3, num_heads=4, num_classes=7,
                        encoder_depth=3, z_dims=(20, 12), projector_dim=40, qk_norm=True),
        dict(patch=2, heads=4, encoder_depth=3, out_channels=4, qk_norm=True)),
    "repa-sit 3x3 grid of patch 3, tap at block 1": (
        lambda: REPASiT(input_size=9, patch_size=3, hidden_size=36, depth=2, num_heads=3, num_classes=5,
                        encoder_depth=1, z_dims=(16,), projector_dim=24),
        dict(patch=3, heads=3, encoder_depth=1, out_channels=4)),
    "project SiT VAE-simple + projector (learned sigma dropped)": (
        lambda: SiTWithProjectors(input_size=6, patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=5,
                                  vae_simple=True, encoder_depth=2, z_dims=(8,), projector_dim=16),
        dict(patch=2, heads=2, encoder_depth=2, out_channels=8, affine_norm=True)),
    "project DiT VAE-simple + projector (ours)": (
        lambda: DiTWithProjectors(input_size=6, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5,
                                  vae_simple=True, encoder_depth=1, z_dims=(8, 6), projector_dim=16),
        dict(patch=2, heads=2, encoder_depth=1, out_channels=8, affine_norm=True)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_equal_the_reference(case, dtype, reference_attention):
    make, kw = CASES[case]
    torch.manual_seed(0)
    model = reference_attention(_perturb(make()).eval())
    g = torch.Generator().manual_seed(2)
    size = model.x_embedder.img_size
    x = torch.randn(3, 4, size, size, generator=g)
    t = torch.rand(3, generator=g)
    y = torch.randint(0, model.y_embedder.num_classes, (3,), generator=g)
    sd = {k: v.detach().clone().requires_grad_(v.dtype.is_floating_point and k != "pos_embed")
          for k, v in model.state_dict().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out, zs = model(x, t, y)
        ref_out, ref_zs = reference_forward(sd, x, t, y, **kw)
    if isinstance(model, SiT) and model.learn_sigma:
        ref_out = ref_out[:, :4]
    assert out.shape == ref_out.shape and len(zs) == len(ref_zs) == len(model.z_dims)
    torch.testing.assert_close(out.float(), ref_out.float(), **TOL[dtype])
    for z, rz, zd in zip(zs, ref_zs, model.z_dims):
        assert z.shape == (3, model.num_patches, zd)
        torch.testing.assert_close(z.float(), rz.float(), **TOL[dtype])
    # gradients of a loss that reads the output and every projection
    w = [torch.randn(o.shape, generator=g) for o in [out] + zs]
    loss = sum((o.float() * wi).sum() for o, wi in zip([out] + zs, w))
    ref_loss = sum((o.float() * wi).sum() for o, wi in zip([ref_out] + ref_zs, w))
    loss.backward()
    ref_loss.backward()
    grads = dict(model.named_parameters())
    checked = 0
    overall = max(v.grad.abs().max().item() for v in sd.values() if v.grad is not None)
    for k, v in sd.items():
        if v.requires_grad and v.grad is not None:
            gp = grads[k].grad
            # per tensor, floored at 1e-3 of the largest gradient (k_norm.bias: exactly 0 in exact arithmetic)
            scale = max(v.grad.abs().max().item(), 1e-3 * overall)
            tol = 1e-4 if dtype == torch.float32 else 8e-2
            assert (gp - v.grad).abs().max().item() <= tol * scale, k
            checked += 1
    assert checked >= len(sd) - 3   # every trained tensor (the unused null-label-free rows aside)


def test_projectors_leave_the_output_of_the_project_models_unchanged():
    """The projector reads the hidden state; the SiT/DiT output is the base model's for the same weights."""
    for base_name, repa_cls in (("SiT-tiny/2-VAE-simple", SiTWithProjectors), ("DiT-tiny/2-VAE-simple",
                                                                                 DiTWithProjectors)):
        torch.manual_seed(0)
        base = _perturb(create_model(base_name)).eval()
        ours = create_model(base_name + "-REPA").eval()
        assert type(ours) is repa_cls
        missing, unexpected = ours.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and missing and all(k.startswith("projectors.") for k in missing)
        x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 3])
        out, zs = ours(x, t, y)
        torch.testing.assert_close(out, base(x, t, y), atol=0, rtol=0)
        assert [z.shape for z in zs] == [(2, 16, 64)]


def test_repa_keys_order_and_size():
    m = create_model("SiT-XL/2-REPA", device="meta")
    keys = list(m.state_dict())
    proj = [k for k in keys if k.startswith("projectors.")]
    assert proj == [f"projectors.0.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")]
    # REPA's module order: ..., blocks, projectors, final_layer (keys and optimizer parameter order)
    first_final = keys.index("final_layer.linear.weight")
    assert keys.index(proj[-1]) < first_final and keys.index("blocks.27.adaLN_modulation.1.bias") < keys.index(proj[0])
    sd = m.state_dict()
    assert sd["projectors.0.0.weight"].shape == (2048, 1152) and sd["projectors.0.4.weight"].shape == (768, 2048)
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 4, 1152)        # no learned sigma
    assert not any(".norm1.weight" in k for k in keys)                        # non-affine block norms
    # REPA's SiT-XL/2 with one DINOv2-B projector: 683,242,512 parameters (REPA's module counted the same)
    assert sum(p.numel() for p in m.parameters()) == 683_242_512
    assert m.encoder_depth == 8 and m.z_dims == (768,) and m.time_reversed


def test_projector_init_is_repas():
    m = create_model("SiT-B/2-REPA")
    for i, (fan_in, fan_out) in zip((0, 2, 4), ((768, 2048), (2048, 2048), (2048, 768))):
        w, b = m.projectors[0][i].weight, m.projectors[0][i].bias
        bound = math.sqrt(6 / (fan_in + fan_out))                                 # xavier-uniform
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.02 * bound and torch.all(b == 0)


def test_bad_keywords_are_refused():
    for depth in (0, 3, -1):
        with pytest.raises(ValueError, match="encoder_depth.*1..2"):
            create_model("SiT-tiny/2-REPA", encoder_depth=depth)
    with pytest.raises(ValueError, match="z_dims"):
        create_model("SiT-tiny/2-VAE-simple-REPA", z_dims=())
    with pytest.raises(ValueError, match="projector_dim"):
        create_model("DiT-tiny/2-VAE-simple-REPA", projector_dim=0)


def test_registry_entries_and_families():
    names = set(list_models())
    for s in ("B", "L", "XL"):
        assert {f"SiT-{s}/2-REPA", f"SiT-{s}/2-VAE-simple-REPA", f"DiT-{s}/2-VAE-simple-REPA"} <= names
        assert model_family(f"SiT-{s}/2-REPA") == "sit" and model_family(f"DiT-{s}/2-VAE-simple-REPA") == "dit"
    assert type(create_model("SiT-L/2-REPA", device="meta")) is REPASiT


@pytest.mark.parametrize("name", ["SiT-tiny/2-REPA", "SiT-tiny/2-VAE-simple-REPA", "DiT-tiny/2-VAE-simple-REPA"])
def test_flops_include_the_projector(name, reference_attention):
    m = reference_attention(create_model(name, kernels="torch").eval())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    assert counter.get_total_flops() / 2 == pytest.approx(m.flops_per_sample(), rel=1e-9)
    if name.endswith("VAE-simple-REPA"):   # exactly the base model's FLOPs + the projector's on 16 tokens
        base = create_model(name[: -len("-REPA")], device="meta")
        assert m.flops_per_sample() - base.flops_per_sample() == 2 * 16 * (128 * 256 + 256 * 256 + 256 * 64)


def test_grad_checkpointing_changes_nothing():
    torch.manual_seed(0)
    ref = _perturb(create_model("SiT-tiny/2-REPA", kernels="torch")).eval()
    ac = copy.deepcopy(ref)
    assert ac.set_grad_checkpointing(True) == 2
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    (o1, z1), (o2, z2) = ref(x, t, y), ac(x, t, y)
    (o1.square().mean() + z1[0].square().mean()).backward()
    (o2.square().mean() + z2[0].square().mean()).backward()
    for (n, p), q in zip(ref.named_parameters(), ac.parameters()):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n


# ------------------------------------------------------------------------------------------- sampling
def repa_euler(model, z, y, steps):
    """REPA samplers.py euler_sampler without guidance: t from 1 (noise) to 0 (data), x += (t' - t) v(x, t)."""
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = z.double()
    for tc, tn in zip(ts[:-1], ts[1:]):
        v = model(x.float(), torch.full((len(x),), float(tc)), y)[0].double()
        x = x + (tn - tc) * v
    return x.float()


def repa_euler_maruyama(model, z, y, steps, noises, cfg_scale=1.0, guidance_high=1.0, null=10):
    """REPA samplers.py euler_maruyama_sampler: linspace(1, 0.04, steps) then 0; drift v - t * score (the
    diffusion 2t), score = (-(1 - t) v - x) / t; guidance on the drift for t <= guidance_high; last step mean."""
    ts = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = z.double()

    def drift(x, tc):
        guided = cfg_scale > 1 and tc <= guidance_high
        xin = torch.cat([x, x]) if guided else x
        yin = torch.cat([y, torch.full_like(y, null)]) if guided else y
        tt = torch.full((len(xin),), float(tc), dtype=torch.float64)
        v = model(xin.float(), tt.float(), yin)[0].double()
        score = (-(1 - tc) * v - xin) / tc
        d = v - tc * score
        if guided:
            c, u = d.chunk(2)
            d = u + cfg_scale * (c - u)
        return d

    for i, (tc, tn) in enumerate(zip(ts[:-2], ts[1:-1])):
        dt = tn - tc
        x = x + drift(x, float(tc)) * dt + torch.sqrt(2 * tc) * noises[i].double() * torch.sqrt(dt.abs())
    tc, tn = ts[-2], ts[-1]
    return (x + (tn - tc) * drift(x, float(tc))).float()


@pytest.fixture(scope="module")
def tiny_repa():
    torch.manual_seed(0)
    return _perturb(create_model("SiT-tiny/2-REPA", kernels="torch"), scale=0.1).eval()


def test_sampler_path_drops_zs_and_follows_repas_time(tiny_repa):
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 5, 9])
    fn = make_model_fn(tiny_repa, num_classes=10)
    out = fn(z, torch.full((3,), 0.3), y)
    assert torch.is_tensor(out) and out.shape == z.shape
    torch.testing.assert_close(out, -tiny_repa(z, torch.full((3,), 0.7), y)[0], atol=0, rtol=0)
    with torch.no_grad():
        ref = repa_euler(tiny_repa, z, y, steps=10)
    ours = build_sampler("euler", create_transport(), 10)(fn, z, y)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cfg_scale,guidance_high", [(1.0, 1.0), (1.8, 0.7)])
def test_sde_sampling_equals_repas_euler_maruyama(tiny_repa, cfg_scale, guidance_high):
    """REPA's SDE sampler with its guidance interval (t <= 0.7, t = 1 noise) is the project's SDE sampler over the
    same field with the interval (1 - 0.7, 1] in the project's time."""
    steps = 8
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 4, 8, 8, generator=g)
    y = torch.tensor([2, 4, 6])
    noises = [torch.randn(z.shape, generator=g) for _ in range(steps)]
    with torch.no_grad():
        ref = repa_euler_maruyama(tiny_repa, z, y, steps, noises, cfg_scale, guidance_high)
    fn = make_model_fn(tiny_repa, num_classes=10, cfg_scale=cfg_scale,
                       interval=(1 - guidance_high, 1.0) if cfg_scale != 1.0 else None)
    it = iter(noises)
    ours = build_sampler("sde", create_transport(), steps, last_step=0.04)(fn, z, y, noise_fn=lambda x: next(it))
    torch.testing.assert_close(ours, ref, atol=5e-5, rtol=1e-4)


def test_project_models_sample_in_the_project_time():
    torch.manual_seed(0)
    m = _perturb(create_model("SiT-tiny/2-VAE-simple-REPA")).eval()
    fn = make_model_fn(m, num_classes=10)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    torch.testing.assert_close(fn(x, t, y), m(x, t, y)[0], atol=0, rtol=0)
    d = _perturb(create_model("DiT-tiny/2-VAE-simple-REPA")).eval()
    out = make_model_fn(d, num_classes=10)(x, t * 999, y)
    assert out.shape == (2, 8, 8, 8)
