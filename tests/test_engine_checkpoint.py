"""The engines' one DCP checkpoint path on a real tiny model (local engine, in-process): a round trip restores
model, optimizer, EMA and GradScaler exactly, and a checkpoint taken before any applied step leaves the optimizer
as fresh as it was (DCP's get_state_dict would otherwise initialise Adam's state with a zero-lr step)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402


def _engine(precision="fp32"):
    from usp_scale.config import EngineConfig, OptimConfig
    from usp_scale.engine import build_engine
    from usp_scale.training.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    ocfg = OptimConfig(lr=1e-2, weight_decay=0.05, fused=False)
    return build_engine(EngineConfig(name="local", precision=precision), H.engine_model(),
                        lambda m: build_optimizer(ocfg, param_groups(m, 0.05), torch.device("cpu")))


def _steps(eng, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        with eng.autocast():
            loss = torch.nn.functional.cross_entropy(eng(x).float(), y)
        eng.backward(loss)
        eng.step()


def test_round_trip_is_exact(tmp_path):
    from usp_scale.training.ema import EMA

    a = _engine("fp16")
    ema_a = EMA(a.weights.ema_sources(), 0.9)
    _steps(a, 3)
    ema_a.update(a.weights.ema_sources())
    a.state.save(str(tmp_path / "e"), ema_a.state_dict())
    assert os.path.isfile(tmp_path / "e" / "dcp" / ".metadata")
    b = _engine("fp16")
    ema_b = EMA(b.weights.ema_sources(), 0.9)
    b.state.load(str(tmp_path / "e"), ema_b.state_dict())
    for (n, p), q in zip(a.unwrapped.named_parameters(), b.unwrapped.parameters()):
        assert torch.equal(p, q), n
    assert all(torch.equal(ema_a.shadow[k], ema_b.shadow[k]) for k in ema_a.shadow)
    assert b.scaler.get_scale() == a.scaler.get_scale()
    _steps(a, 2, seed=5)
    _steps(b, 2, seed=5)  # the same continuation: moments and step counts were restored too
    for (n, p), q in zip(a.unwrapped.named_parameters(), b.unwrapped.parameters()):
        assert torch.equal(p, q), n


def test_checkpoint_before_the_first_step_keeps_the_optimizer_fresh(tmp_path):
    a = _engine()
    a.state.save(str(tmp_path / "e"))
    assert not a.optimizer.state  # saving did not initialise it
    b = _engine()
    b.state.load(str(tmp_path / "e"))
    assert not b.optimizer.state
    ref = _engine()
    for e in (a, b, ref):
        _steps(e, 2)
    for p, q, r in zip(a.unwrapped.parameters(), b.unwrapped.parameters(), ref.unwrapped.parameters()):
        assert torch.equal(p, r) and torch.equal(q, r)
