"""engine.fp8: torchao float8 training of the blocks' attention/MLP linears (runs on the CPU for these tests)."""
import os
import sys

import pytest
import torch

pytest.importorskip("torchao.float8")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402

from usp_scale.config import ConfigError, EngineConfig  # noqa: E402
from usp_scale.engine.fp8 import apply_fp8, fp8_targets  # noqa: E402
from usp_scale.models import create_model  # noqa: E402


@pytest.mark.parametrize("name,kw", [("DiT-tiny/2", dict(input_size=8, num_classes=10)),
                                     ("vit_tiny_patch_vae", dict(img_size=8))])
def test_targets_are_the_block_linears_and_names_do_not_change(name, kw):
    torch.manual_seed(0)
    m = create_model(name, **kw)
    keys = list(m.state_dict())
    targets = apply_fp8(m, "tensorwise", torch.device("cpu"))
    blocks = len(m.blocks) + len(getattr(m, "decoder_blocks", []))
    assert len(targets) == 4 * blocks
    assert all(t.split(".")[-2:] in (["attn", "qkv"], ["attn", "proj"], ["mlp", "fc1"], ["mlp", "fc2"]) for t in targets)
    for mod_name, mod in m.named_modules():
        is_fp8 = type(mod).__name__ == "Float8Linear"
        assert is_fp8 == (mod_name in targets), mod_name           # adaLN, embedders and heads stay as they are
    assert list(m.state_dict()) == keys                             # checkpoints interchangeable with bf16 runs
    assert fp8_targets(m) == []                                     # nothing left to convert


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_forward_and_gradients_track_bf16(recipe):
    torch.manual_seed(0)
    ref = create_model("DiT-tiny/2", input_size=8, num_classes=10)
    for p in ref.parameters():                                     # leave adaLN-Zero's zero init: live blocks
        p.data.add_(0.02 * torch.randn_like(p))
    m = create_model("DiT-tiny/2", input_size=8, num_classes=10)
    m.load_state_dict(ref.state_dict())
    apply_fp8(m, recipe, torch.device("cpu"))
    x, t, y = torch.randn(8, 4, 8, 8), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,))
    outs, grads = [], []
    for model in (ref, m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y).float()
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    rel = (outs[0] - outs[1]).norm() / outs[0].norm()
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert 0 < rel < 0.1 and cos > 0.98, (rel, cos)                 # FP8 rounding, not a different function


def test_fp8_training_resumes_exactly(tmp_path):
    r = H.run_resume_pair("local", str(tmp_path), **{"engine.fp8": "tensorwise"})
    assert len(r["full"]) == 10 and r["full"] == r["split"]
    assert r["model_equal"] and r["ema_equal"]
    assert all(v == v for v in r["full"])


def test_fp8_config_errors(monkeypatch):
    """The config refuses them when it loads (the one place: usp_scale.config.validate)."""
    from usp_scale.config import load_config

    tiny = os.path.join(H.REPO, "configs", "debug", "tiny.yaml")
    model = create_model("DiT-tiny/2", input_size=8, num_classes=10)
    with pytest.raises(ConfigError, match="engine.fp8='e4m3'"):
        load_config(tiny, ["engine.fp8=e4m3"])
    with pytest.raises(ConfigError, match="not deepspeed"):
        load_config(tiny, ["engine.fp8=tensorwise", "engine.name=deepspeed"])
    with pytest.raises(ConfigError, match="fp16"):
        load_config(tiny, ["engine.fp8=tensorwise", "engine.precision=fp16"])
    monkeypatch.setitem(sys.modules, "torchao.float8", None)        # torchao not installed
    with pytest.raises(RuntimeError, match="needs torchao"):
        apply_fp8(model, "tensorwise", torch.device("cpu"))
