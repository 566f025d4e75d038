"""Attention backend dispatch: choice per shape, forced backends, errors, logging, and equality with
the explicit-softmax reference for head dims 72, 64 and 32."""
import logging
import sys
import types

import pytest
import torch

import importlib

A = importlib.import_module("usp_scale.layers.attention")  # the module (the package exports a function of that name)

HEAD_DIMS = [72, 64, 32]


@pytest.fixture(autouse=True)
def _reset():
    A.reset_attention()
    yield
    A.reset_attention()


def _reference_out(m: A.Attention, x: torch.Tensor) -> torch.Tensor:
    B, N, C = x.shape
    qkv = m.qkv(x).reshape(B, N, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    return m.proj(A.attention_reference(*qkv.unbind(0)).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_cpu_backends_match_reference(backend, head_dim, caplog):
    torch.manual_seed(0)
    m = A.Attention(4 * head_dim, 4)
    x = torch.randn(3, 50, 4 * head_dim, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="usp_scale.attention"):
        A.configure_attention(backend, "cpu")
        y = m(x)
        m(x)
    assert A.current_choices() == {(4, 50, head_dim, torch.float32): "sdpa_math"}
    chosen = [r for r in caplog.records if "->" in r.getMessage()]
    assert len(chosen) == 1 and "sdpa_math" in chosen[0].getMessage()       # logged once per shape
    ref = _reference_out(m, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gx, = torch.autograd.grad(y.square().sum(), x)
    gr, = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gx, gr, rtol=1e-4, atol=1e-5)


def test_unconfigured_is_plain_sdpa_and_functional_form():
    q, k, v = torch.randn(3, 2, 4, 17, 72).unbind(0)
    torch.testing.assert_close(A.attention(q, k, v), A.attention_reference(q, k, v), rtol=1e-5, atol=1e-5)
    A.configure_attention("math", "cpu")
    torch.testing.assert_close(A.attention(q, k, v), A.attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cudnn", "efficient", "flash2", "flash3"])
def test_forced_unavailable_backend_is_an_error(backend):
    with pytest.raises(RuntimeError, match=f"attn_backend={backend} is unavailable"):
        A.configure_attention(backend, "cpu")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="must be one of"):
        A.configure_attention("xformers", "cpu")


def _fake_flash(monkeypatch, calls):
    """A stand-in flash_attn (reference maths in its (B, N, H, d) layout) and a 'CUDA' CPU device."""
    def qkvpacked(qkv):
        calls.append(tuple(qkv.shape))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return A.attention_reference(q, k, v).transpose(1, 2)

    mod = types.ModuleType("flash_attn")
    mod.flash_attn_qkvpacked_func = qkvpacked
    monkeypatch.setitem(sys.modules, "flash_attn", mod)
    monkeypatch.setattr(A, "backend_unavailable",
                        lambda name, device: None if name == "flash2" else f"{name} off in this test")
    monkeypatch.setattr(A, "_auto_order", lambda device: ("flash3", "flash2", "sdpa"))


def test_auto_prefers_flash_in_its_layout(monkeypatch, caplog):
    calls = []
    _fake_flash(monkeypatch, calls)
    monkeypatch.setattr(A, "_probe", lambda name, key, device: None if name == "flash2" else "not here")
    torch.manual_seed(0)
    m = A.Attention(2 * 72, 2)
    x = torch.randn(3, 49, 144)
    with caplog.at_level(logging.INFO, logger="usp_scale.attention"):
        A.configure_attention("auto", "cpu")
        y = m(x)
    assert calls == [(3, 49, 3, 2, 72)]                                   # packed (B, N, 3, H, d)
    assert A.current_choices() == {(2, 49, 72, torch.float32): "flash2"}
    assert any("flash3: not here" in r.getMessage() for r in caplog.records)  # why flash3 was skipped
    torch.testing.assert_close(y, _reference_out(m, x), rtol=1e-5, atol=1e-5)


def test_forced_flash_on_unsupported_dtype_is_an_error(monkeypatch):
    _fake_flash(monkeypatch, [])
    A.configure_attention("flash2", "cpu")
    with pytest.raises(RuntimeError, match="flash2 cannot run .* head_dim=72 .*fp16/bf16"):
        A.Attention(144, 2)(torch.randn(2, 5, 144))


def test_sdpa_choice_is_timed_per_shape(monkeypatch):
    """On CUDA, 'sdpa' probes cudnn/flash/efficient per shape and keeps the fastest one that runs."""
    monkeypatch.setattr(A, "_probe", lambda name, key, device: "no kernel" if (name, key[3]) == ("flash", 72)
                        else None)
    table = {("cudnn", 72): 1.0, ("efficient", 72): 2.0, ("cudnn", 64): 3.0, ("flash", 64): 1.5,
             ("efficient", 64): 2.5}
    monkeypatch.setattr(A, "_time_ms", lambda name, key, device: table[(name, key[3])])
    A._STATE.update(backend="sdpa", device=torch.device("cuda", 0))
    a = A._choose((4, 16, 256, 72, torch.bfloat16))
    b = A._choose((4, 12, 256, 64, torch.bfloat16))
    assert a[0] == "sdpa_cudnn" and b[0] == "sdpa_flash"
    monkeypatch.setattr(A, "_probe", lambda name, key, device: "no kernel")
    A._CHOICES.clear()
    with pytest.raises(RuntimeError, match="no SDPA GPU backend runs"):
        A._choose((4, 16, 256, 72, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "sdpa", "cudnn", "efficient", "flash2", "flash3"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_gpu_backends_match_reference(backend, head_dim):
    if backend not in ("auto", "sdpa") and A.backend_unavailable(backend, torch.device("cuda")):
        pytest.skip(A.backend_unavailable(backend, torch.device("cuda")))
    torch.manual_seed(0)
    m = A.Attention(16 * head_dim, 16).cuda().bfloat16()
    x = torch.randn(4, 256, 16 * head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    try:
        A.configure_attention(backend, "cuda")
        y = m(x)
    except RuntimeError as e:  # a forced backend without a kernel for this head dim must say so
        assert "cannot run" in str(e)
        pytest.skip(str(e))
    torch.testing.assert_close(y.float(), _reference_out(m, x).float(), rtol=3e-2, atol=3e-2)
    assert not A.current_choices() or "math" not in next(iter(A.current_choices().values()))


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_first_call_under_no_grad(ctx):
    """The per-shape probe (forward + backward) must work when the first call comes from sampling."""
    A.configure_attention("math", "cpu")
    m = A.Attention(144, 2)
    x = torch.randn(2, 9, 144)
    with getattr(torch, ctx)():
        y = m(x)
    assert A.current_choices() == {(2, 9, 72, torch.float32): "sdpa_math"}
    torch.testing.assert_close(y, _reference_out(m, x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_dispatch_under_torch_compile():
    """Chosen before compiling: fullgraph works; chosen at the first compiled call: still correct."""
    A.configure_attention("math", "cpu", shapes=[(2, 2, 9, 72, torch.float32)])
    m = A.Attention(144, 2)
    x = torch.randn(2, 9, 144)
    ref = _reference_out(m, x)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), ref, rtol=1e-5, atol=1e-5)
    A.configure_attention("auto", "cpu")
    torch._dynamo.reset()
    c = torch.compile(m)
    c(x)
    torch.testing.assert_close(c(x), ref, rtol=1e-5, atol=1e-5)
    assert A.current_choices() == {(2, 9, 72, torch.float32): "sdpa_math"}
