"""The attention dispatcher's first call at a new shape (probing/timing backends) must leave the global CPU
and CUDA RNG streams untouched, so training noise is the same before and after a resume."""
import importlib

import pytest
import torch

A = importlib.import_module("usp_scale.layers.attention")


@pytest.fixture(autouse=True)
def _reset():
    A.reset_attention()
    yield
    A.reset_attention()


def _states(device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _same(a, b):
    return torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1]))


def _first_call_keeps_rng(backend, device):
    torch.manual_seed(123)
    m = A.Attention(64, 4).to(device)
    x = torch.randn(2, 17, 64, device=device)  # a shape not seen before
    A.configure_attention(backend, device)
    before = _states(device)
    with torch.no_grad():
        m(x)
    assert len(A.current_choices()) == 1  # the dispatcher really chose (and, for "math", probed) here
    assert _same(before, _states(device)), f"backend={backend}: the first call moved the global RNG"
    # and the draws after it are the ones a run without the probe would get
    torch.manual_seed(5)
    want = torch.rand(3)
    A.reset_attention()
    A.configure_attention(backend, device)
    torch.manual_seed(5)
    with torch.no_grad():
        m(torch.zeros(1, 9, 64, device=device))
    assert torch.equal(torch.rand(3), want)


@pytest.mark.parametrize("backend", ["math", "auto", "sdpa"])
def test_first_call_on_new_shape_keeps_cpu_rng(backend):
    _first_call_keeps_rng(backend, torch.device("cpu"))


def test_library_draws_inside_the_probe_are_isolated(monkeypatch):
    """Even a backend whose kernel draws global random numbers (e.g. a dropout) cannot leak out of the probe."""
    real = A._fn_for

    def hungry(name):
        fn = real(name)

        def f(qkv):
            torch.rand(4)  # global CPU draw
            return fn(qkv)
        return f

    monkeypatch.setattr(A, "_fn_for", hungry)
    A.configure_attention("math", "cpu")
    torch.manual_seed(0)
    before = torch.get_rng_state()
    A._choose((2, 4, 17, 16, torch.float32))
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_first_call_on_new_shape_keeps_cuda_rng(backend):
    _first_call_keeps_rng(backend, torch.device("cuda", torch.cuda.current_device()))
