"""Kernel selection: usp_scale.kernels imports without triton, and kernels=auto|triton|torch resolves
as documented, with a clear error when triton cannot run."""
import subprocess
import sys

import pytest
import torch

from usp_scale.kernels import dispatch


def test_package_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import importlib.util as u; u.find_spec = (lambda f: (lambda n, *a: None if n == 'triton' else f(n, *a)))(u.find_spec)\n"
            "import usp_scale.kernels as k, usp_scale.layers.fused as f, usp_scale.models\n"
            "assert not k.triton_available()\n"
            "assert k.resolve_impl('auto', 'cpu') == 'torch'\n"
            "try:\n    k.resolve_impl('triton', 'cpu')\nexcept RuntimeError as e:\n    assert 'triton is not installed' in str(e); print('OK')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_resolve_impl():
    assert dispatch.resolve_impl("torch", "cpu") == "torch"
    assert dispatch.resolve_impl("auto", torch.device("cpu")) == "torch"       # auto: Triton on CUDA only
    if dispatch.interpreting():                                                # conftest's default
        assert dispatch.resolve_impl("triton", "cpu") == "triton"
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            dispatch.resolve_impl("triton", "cpu")
    with pytest.raises(ValueError, match="model.kernels must be one of"):
        dispatch.resolve_impl("fast", "cpu")
    with pytest.raises(RuntimeError, match="neither CUDA nor a CPU under TRITON_INTERPRET"):
        dispatch.resolve_impl("triton", "meta")


def test_auto_uses_triton_only_for_ops_measured_faster(monkeypatch):
    from usp_scale.kernels import dispatch

    monkeypatch.setattr(dispatch, "triton_usable", lambda device: True)
    cuda = torch.device("cuda", 0)
    assert dispatch.resolve_impl("auto", cuda, "layernorm_modulate") == "triton"
    assert dispatch.resolve_impl("auto", cuda, "unshuffle") == "triton"
    assert dispatch.resolve_impl("auto", cuda, "embed_visible_patches") == "torch"
    assert dispatch.resolve_impl("auto", cuda, "masked_latent_loss") == "torch"
    assert dispatch.resolve_impl("triton", cuda, "masked_latent_loss") == "triton"
    assert dispatch.resolve_impl("auto", torch.device("cpu"), "layernorm_modulate") == "torch"


def test_auto_leaves_fusion_to_inductor_under_compile(monkeypatch):
    """While torch.compile traces, "auto" gives the torch reference (Inductor fuses it with its neighbours);
    "triton" still forces the kernels."""
    monkeypatch.setattr(dispatch, "triton_usable", lambda device: True)
    cuda = torch.device("cuda", 0)

    def pick(x, mode):
        return x + (1.0 if dispatch.resolve_impl(mode, cuda, "layernorm_modulate") == "triton" else 0.0)

    x = torch.zeros(2)
    torch._dynamo.reset()
    assert pick(x, "auto").tolist() == [1.0, 1.0]                               # eager: the Triton kernel
    assert torch.compile(pick, backend="eager", fullgraph=True)(x, "auto").tolist() == [0.0, 0.0]
    assert torch.compile(pick, backend="eager", fullgraph=True)(x, "triton").tolist() == [1.0, 1.0]
