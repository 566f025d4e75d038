"""The attention module: the fused path against the explicit-softmax reference (outputs and gradients, fp32 and
bf16, head dims 72/64/32, odd sequence lengths), the start-up backend choice (usp_scale.runtime.resolve_attention:
CPU cases that resolve to three different kernels, checked by the op that really ran), FlashAttention's layout and
input rules through stand-ins, errors, and the choice agreed over two gloo ranks with no collective in any later
forward (the choice is a module attribute: nothing process-wide)."""
import importlib
import json
import os
import sys
import types

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import _helpers_train as H
from usp_scale.models import create_model

A = importlib.import_module("usp_scale.layers.attention")  # the kernels and the module
R = importlib.import_module("usp_scale.runtime.attention")  # the start-up choice

HEAD_DIMS = [72, 64, 32]
# The op each CPU backend runs (None: the explicit softmax, no SDPA op at all).
CPU_OPS = {"math": "aten::_scaled_dot_product_attention_math",
           "sdpa": "aten::_scaled_dot_product_flash_attention_for_cpu", "reference": None}
SDPA_OPS = tuple(op for op in CPU_OPS.values() if op)


def _ran(fn):
    """(result of fn(), the SDPA ops it ran)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name for e in prof.events() if e.name in SDPA_OPS}


def _module_and_input(head_dim, heads=3, tokens=17, batch=2, dtype=torch.float32, seed=0, backend="sdpa"):
    torch.manual_seed(seed)
    m = A.Attention(heads * head_dim, heads, backend=backend).to(dtype)
    x = torch.randn(batch, tokens, heads * head_dim, dtype=dtype, requires_grad=True)
    return m, x


def _out_and_grads(m, x):
    y = m(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    grads = torch.autograd.grad(y, [x] + list(m.parameters()), g)
    return y.detach(), grads


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("tokens", [1, 17, 50, 197])
def test_cpu_backends_are_different_kernels_with_the_same_result(head_dim, tokens):
    """auto (math), sdpa and reference resolve to three different kernels on the CPU; outputs and gradients agree."""
    results = {}
    for backend in ("auto", "sdpa", "reference"):
        chosen = R.resolve_attention(backend, "cpu")
        m, x = _module_and_input(head_dim, tokens=tokens, backend=R.attention_spec(backend, chosen))
        (y, grads), ops = _ran(lambda: _out_and_grads(m, x))
        want = CPU_OPS[chosen]
        assert ops == ({want} if want else set()), f"{backend} -> {chosen} ran {ops}"
        results[chosen] = (y, grads)
    assert set(results) == {"math", "sdpa", "reference"}
    y_ref, g_ref = results["reference"]
    for name in ("math", "sdpa"):
        y, grads = results[name]
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=f"{name} output")
        for a, b in zip(grads, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} gradient")


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
@pytest.mark.parametrize("head_dim", [72, 32])
def test_fused_vs_reference_in_bf16(backend, head_dim):
    """The module switch in bf16: the fused kernel (bf16 in, fp32 accumulate) against the fp32 reference."""
    spec = R.attention_spec(backend, R.resolve_attention(backend, "cpu"))
    m, x = _module_and_input(head_dim, tokens=49, dtype=torch.bfloat16, backend=spec)
    (y_f, g_f), ops_f = _ran(lambda: _out_and_grads(m, x))
    m.fused_attn = False
    (y_r, g_r), ops_r = _ran(lambda: _out_and_grads(m, x))
    assert ops_f and not ops_r
    torch.testing.assert_close(y_f.float(), y_r.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(g_f, g_r):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 3e-2 * scale


def test_module_switch_and_model_switch():
    m, x = _module_and_input(64, backend="math")
    assert m.fused_attn and m.backend == "math"
    _, ops = _ran(lambda: m(x))
    assert ops == {CPU_OPS["math"]}
    m.fused_attn = False                                     # this module only: the explicit softmax
    _, ops = _ran(lambda: m(x))
    assert ops == set()
    m.fused_attn = True
    model = create_model("DiT-tiny/2", attn_backend="reference")   # the whole model: every module follows
    mods = [a for a in model.modules() if isinstance(a, A.Attention)]
    assert mods and all(a.backend == "reference" and not a.fused_attn for a in mods)
    assert model.set_attn_backend("math") == len(mods) and all(a.fused_attn for a in mods)
    m.set_backend("reference")
    _, ops = _ran(lambda: m(x))
    assert ops == set()
    m.fused_attn = True                                      # forced fused under "reference": its kernel is the reference
    torch.testing.assert_close(m(x), A.Attention.forward(m, x))


def test_default_is_plain_sdpa():
    m, x = _module_and_input(72)
    assert m.backend == "sdpa" and create_model("DiT-tiny/2").blocks[0].attn.backend == "sdpa"
    (y, _), ops = _ran(lambda: _out_and_grads(m, x))
    assert ops == {CPU_OPS["sdpa"]}
    m.fused_attn = False
    torch.testing.assert_close(y, _out_and_grads(m, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cudnn", "efficient", "flash2", "flash3"])
def test_forced_unavailable_backend_is_an_error(backend):
    with pytest.raises(RuntimeError, match=f"attn_backend={backend} is unavailable"):
        R.resolve_attention(backend, "cpu")


def test_unknown_backend_name():
    """The config refuses it when it loads (the schema's choices); a module refuses an unknown spec."""
    from usp_scale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.attn_backend='xformers'"):
        load_config(os.path.join(H.REPO, "configs", "debug", "tiny.yaml"), ["model.attn_backend=xformers"])
    with pytest.raises(ValueError, match="use one of"):
        A.Attention(64, 4, backend="xformers")
    assert set(R.BACKENDS) == set(A.KERNELS) | {"auto"}


def test_choice_draws_no_random_numbers():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    spec = R.attention_spec("auto", R.resolve_attention("auto", "cpu"))
    m = A.Attention(64, 4, backend=spec).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        m(torch.zeros(2, 9, 64))
    assert torch.equal(before, torch.get_rng_state())


# --------------------------------------------------------------------------------- FlashAttention stand-ins
def _fake_flash(monkeypatch, calls):
    """Stand-ins for flash_attn (qkv packed (B, N, 3, H, d)) and flash_attn_interface (q, k, v each (B, N, H, d)),
    computing the reference in their layouts, and both 'available' on a 'CUDA' device."""
    def qkvpacked(qkv):
        calls.append(("flash2", tuple(qkv.shape)))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return A.attention_reference(q, k, v).transpose(1, 2)

    def func(q, k, v, softmax_scale):
        calls.append(("flash3", tuple(q.shape)))
        assert softmax_scale == q.shape[-1] ** -0.5
        out = A.attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return out, None                                     # some releases also return the lse

    f2, f3 = types.ModuleType("flash_attn"), types.ModuleType("flash_attn_interface")
    f2.flash_attn_qkvpacked_func, f3.flash_attn_func = qkvpacked, func
    monkeypatch.setitem(sys.modules, "flash_attn", f2)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", f3)
    monkeypatch.setattr(R, "backend_unavailable", lambda name, device: None)


CUDA0 = torch.device("cuda", 0)   # never touched: the stand-ins run on CPU tensors


def test_auto_prefers_flash3_then_flash2_and_routes_other_inputs_elsewhere(monkeypatch):
    calls = []
    _fake_flash(monkeypatch, calls)
    assert R.resolve_attention("auto", CUDA0) == "flash3" and R.attention_spec("auto", "flash3") == "flash3/sdpa"
    m, x = _module_and_input(64, tokens=49, dtype=torch.bfloat16, backend="flash3/sdpa")
    y = m(x)                                                  # the module runs the stand-in in its layout
    assert calls == [("flash3", (2, 49, 3, 64))]
    m.fused_attn = False
    torch.testing.assert_close(y, m(x), rtol=2e-2, atol=2e-2)
    monkeypatch.setattr(R, "backend_unavailable", lambda name, device: "off here" if name == "flash3" else None)
    assert R.resolve_attention("auto", CUDA0) == "flash2"
    # The auto rule (here with the CPU's SDPA as the other path): head dim 72 and fp32 inputs skip FlashAttention-3.
    fn = A.attention_kernel("flash3/sdpa")
    for head_dim, dtype, expect in ((64, torch.bfloat16, ["flash3"]), (72, torch.bfloat16, []),
                                    (64, torch.float32, [])):
        qkv = torch.randn(2, 49, 3, 3, head_dim).to(dtype)
        calls.clear()
        out = fn(qkv)
        assert [c[0] for c in calls] == expect, (head_dim, dtype)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), A._reference(qkv).float(), rtol=tol, atol=tol)


def test_flash2_layout_and_dtype_rule(monkeypatch):
    """flash2 gets packed qkv in bf16; fp32 inputs go to SDPA under auto and are an error when flash2 is forced."""
    calls = []
    _fake_flash(monkeypatch, calls)
    auto_fn, forced_fn = A.attention_kernel(R.attention_spec("auto", "flash2")), A.attention_kernel("flash2")
    qkv = torch.randn(3, 49, 3, 2, 72)
    ref = A._reference(qkv)
    torch.testing.assert_close(forced_fn(qkv.bfloat16()).float(), ref, rtol=2e-2, atol=2e-2)
    assert calls == [("flash2", (3, 49, 3, 2, 72))]
    torch.testing.assert_close(auto_fn(qkv), ref, rtol=1e-5, atol=1e-5)      # fp32: SDPA, no flash call
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="flash2 cannot run .* head_dim=72: flash2 needs fp16/bf16"):
        forced_fn(qkv)
    assert A.flash_takes("flash2", torch.bfloat16, 320) is not None and A.flash_takes("flash2", torch.half, 72) is None
    assert A.flash_takes("flash3", torch.bfloat16, 72) is not None and A.flash_takes("flash3", torch.half, 128) is None


def test_sdpa_on_cuda_uses_the_priority_list_without_math(monkeypatch):
    seen = []
    real = A.sdpa_kernel

    def spy(backends, set_priority=False):
        seen.append((tuple(backends), set_priority))
        return real(backends, set_priority=set_priority)

    monkeypatch.setattr(A, "sdpa_kernel", spy)
    A.attention_kernel("sdpa")(torch.randn(1, 5, 3, 2, 8))
    assert seen == []                                         # CPU tensors: SDPA's own choice
    qkv = torch.randn(1, 5, 3, 2, 8)
    # the CUDA path with CPU tensors: the priority list is what is asked of SDPA
    torch.testing.assert_close(A._SDPA_CUDA(qkv), A._reference(qkv))
    assert seen == [(A.SDPA_CUDA_PRIORITY, True)] and A.SDPBackend.MATH not in A.SDPA_CUDA_PRIORITY


# --------------------------------------------------------------------------------- distributed agreement
def test_two_ranks_agree_at_start_up_and_forward_runs_no_collective(tmp_path):
    """Rank 0 has FlashAttention-2, rank 1 has not: auto takes sdpa on both; flash2 forced is an error on both;
    afterwards forwards on rank 0 alone (new shapes and dtypes) run no collective."""
    r = H.torchrun([__file__.replace("test_attention.py", "_helpers_attention.py"), str(tmp_path)], timeout=240)
    assert r.stdout.count(H.OK) == 2, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "attention.json").read_text())
    assert res["auto"] == ["sdpa", "sdpa"]
    assert all("unavailable on rank(s) [1]" in e for e in res["forced"])
    assert res["local_flash2"] == "flash2"                    # rank 0 alone would have taken flash2
    assert res["forward_collectives"] == 0 and res["forward_ok"]


# --------------------------------------------------------------------------------- compile, GPU
@pytest.mark.slow
def test_configured_kernel_under_torch_compile_fullgraph():
    m, x = _module_and_input(72, tokens=9, backend=R.resolve_attention("auto", "cpu"))
    ref = m(x)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "sdpa", "cudnn", "efficient", "flash2", "flash3"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_gpu_backends_match_reference(backend, head_dim):
    why = R.backend_unavailable(backend, torch.device("cuda")) if backend not in ("auto", "sdpa") else None
    if why:
        pytest.skip(why)
    if backend.startswith("flash") and A.flash_takes(backend, torch.bfloat16, head_dim):
        pytest.skip(A.flash_takes(backend, torch.bfloat16, head_dim))
    spec = R.attention_spec(backend, R.resolve_attention(backend, "cuda"))
    torch.manual_seed(0)
    m = A.Attention(16 * head_dim, 16, backend=spec).cuda().bfloat16()
    x = torch.randn(4, 257, 16 * head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y, g = _out_and_grads(m, x)
    m.fused_attn = False
    y_r, g_r = _out_and_grads(m, x)
    torch.testing.assert_close(y.float(), y_r.float(), rtol=3e-2, atol=3e-2)
    for a, b in zip(g, g_r):
        assert (a.float() - b.float()).abs().max().item() <= 5e-2 * b.float().abs().max().item()
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        m.fused_attn = True
        m(x)
    assert not any("math" in e.name for e in prof.events()), "the math kernel ran on a GPU"
