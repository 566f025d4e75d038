"""No host sync per optimizer step: device-side skip of non-finite steps (fused AdamW's found_inf), the gated
EMA, and the trainer reading step results one step late (DeferredStepStats). CPU, local engine."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402
from test_train_trainer import _NaNTask, cfg_for  # noqa: E402

from usp_scale.config import EngineConfig  # noqa: E402
from usp_scale.training import NonFiniteError, Trainer  # noqa: E402
from usp_scale.training.ema import EMA  # noqa: E402
from usp_scale.training.stepstats import DeferredStepStats  # noqa: E402


def _state_equal(a, b):
    return all(torch.equal(torch.tensor(a[k]), torch.tensor(b[k])) for k in a)


def test_fused_adamw_on_cpu_skips_on_the_device():
    from usp_scale.engine import build_engine
    from usp_scale.config import OptimConfig
    from usp_scale.training.optim import build_optimizer, param_groups

    model = H.engine_model()
    for fused, expect in ((True, True), (False, False)):
        eng = build_engine(EngineConfig(name="local", precision="fp32"), model,
                           lambda m: build_optimizer(OptimConfig(fused=fused), param_groups(m, 0.05),
                                                     torch.device("cpu")))
        assert eng.skips_on_device() is expect


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_device_skip_equals_host_skip(clip):
    """(good, NaN, good) steps: the NaN step is skipped with the weights of (good, good) minus nothing; the device
    path (fused) and the host path (foreach) agree on every loss, flag and weight."""
    cfg = EngineConfig(name="local")
    dl, da, dsd = H.engine_losses(cfg, steps=3, nan_at=1, clip=clip, fused=True)
    hl, ha, hsd = H.engine_losses(cfg, steps=3, nan_at=1, clip=clip, fused=False)
    assert da == ha == [True, False, True]
    assert dl[0] == pytest.approx(hl[0], rel=1e-6) and dl[2] == pytest.approx(hl[2], rel=1e-5)
    for k in dsd:
        assert torch.allclose(torch.tensor(dsd[k]), torch.tensor(hsd[k]), atol=1e-5, rtol=0), k
    # the skipped step changed nothing: (good, NaN) == (good) bit for bit, optimizer included
    _, _, one = H.engine_losses(cfg, steps=1, clip=clip, fused=True)
    _, a2, two = H.engine_losses(cfg, steps=2, nan_at=1, clip=clip, fused=True)
    assert a2 == [True, False] and _state_equal(one, two)


def test_skipped_step_leaves_optimizer_state_untouched():
    from usp_scale.engine import build_engine
    from usp_scale.config import OptimConfig
    from usp_scale.training.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    model = H.engine_model()
    eng = build_engine(EngineConfig(name="local", precision="fp32"), model,
                       lambda m: build_optimizer(OptimConfig(fused=True), param_groups(m, 0.05), torch.device("cpu")))
    x = torch.randn(4, 4, 8, 8)
    y = torch.randint(0, 10, (4,))
    for bad in (False, True):
        before = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in st.items()}
                  for k, st in eng.optimizer.state.items()}
        params = [p.detach().clone() for p in model.parameters()]
        loss = torch.nn.functional.cross_entropy(eng(x), y) * (float("inf") if bad else 1.0)
        eng.backward(loss)
        res = eng.step()
        assert isinstance(res.ok, torch.Tensor) and res.ok.dim() == 0 and res.applied is (not bad)
        if bad:
            assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
            for k, st in eng.optimizer.state.items():
                for n, v in st.items():
                    assert torch.equal(v, before[k][n]), n     # exp_avg, exp_avg_sq and the step count
            assert not hasattr(eng.optimizer, "found_inf")


def test_gated_ema():
    src = [("a", torch.randn(5)), ("b", torch.randn(2, 3))]
    e1, e2 = EMA(src, 0.9), EMA(src, 0.9)
    new = [(n, t + 1.0) for n, t in src]
    e1.update(new)
    e2.update(new, gate=torch.tensor(True))
    for n in e1.shadow:
        assert torch.allclose(e1.shadow[n], e2.shadow[n], atol=1e-7, rtol=0)
        assert torch.allclose(e1.shadow[n], 0.9 * dict(src)[n] + 0.1 * dict(new)[n], atol=1e-6)
    kept = {n: v.clone() for n, v in e2.shadow.items()}
    e2.update([(n, t * 7) for n, t in src], gate=torch.tensor(False))
    assert all(torch.equal(kept[n], e2.shadow[n]) for n in kept)
    # the one-call (foreach) gated update equals a per-tensor lerp with the same 0-dim weight, bit for bit
    e3 = EMA(src, 0.9)
    new2 = [(n, t * 3 - 1) for n, t in src]
    e3.update(new2, gate=torch.tensor(True))
    w = torch.tensor(True).float() * (1.0 - 0.9)
    for n, t in src:
        assert torch.equal(e3.shadow[n], t.float().clone().lerp_(dict(new2)[n], w))


def test_deferred_stats_order_and_lag():
    s = DeferredStepStats(torch.device("cpu"), lag=1)
    s.push(1, torch.tensor(True), torch.tensor(2.5), meta="a")
    assert list(s.ready()) == []                       # the newest step is held back
    s.push(2, torch.tensor(False), torch.tensor(float("inf")), meta="b")
    assert list(s.ready()) == [(1, [1.0, 2.5], "a")]
    s.push(3, torch.tensor(True), torch.tensor(1.0))
    assert list(s.flush()) == [(2, [0.0, float("inf")], "b"), (3, [1.0, 1.0], None)]
    assert len(s) == 0
    with pytest.raises(ValueError):
        DeferredStepStats(torch.device("cpu"), lag=-1)


@pytest.mark.parametrize("fused", ["true", "false"])
def test_trainer_counts_skips_between_log_steps(tmp_path, fused):
    """log_every=4: step results reach the host one step late between log steps and are flushed at log steps,
    so every record's counters and mean grad norm are exact."""
    cfg = cfg_for(tmp_path, "schedule.max_steps=8", "log_every=4", "ema.decay=0.9", "optim.clip_grad=0.0",
                  f"optim.fused={fused}")
    res = Trainer(cfg, task=_NaNTask(cfg, bad={5, 12})).fit()     # steps 2 and 6 (accum 2, call 1 = warm-up)
    assert res["nonfinite_total"] == 2
    recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [4, 8] and [r["nonfinite_total"] for r in recs] == [1, 2]
    assert all(r["grad_norm"] > 0 and r["grad_norm"] == r["grad_norm"] for r in recs)


def test_k_nonfinite_detected_one_step_late_between_log_steps(tmp_path):
    cfg = cfg_for(tmp_path, "max_nonfinite=3", "schedule.max_steps=10", "log_every=100", "optim.fused=true")
    with pytest.raises(NonFiniteError) as e:
        Trainer(cfg, task=_NaNTask(cfg, bad=set(range(6, 40)))).fit()  # micro-batches 5.. -> steps 3..
    msg = str(e.value)
    # the third bad step is 5; its result is read while step 6 runs, and step 6's state is checkpointed
    assert "3 consecutive non-finite steps" in msg and "optimizer step 5" in msg
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000006"
    assert str(ckpt) in msg and (ckpt / "meta.json").is_file()
    ts = torch.load(ckpt / "trainer.pt", weights_only=False)["train"]
    assert ts["step"] == 6 and ts["nonfinite_total"] == 4 and ts["nonfinite_streak"] == 4   # steps 3, 4, 5 and 6


class _NoHostReads:
    """Fail on any tensor -> host value read (the CPU stand-in for a device sync) inside the block."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def guard(name):
            def f(self_, *a, **k):
                raise AssertionError(f"host read Tensor.{name} inside the training step")
            return f

        for n in self.NAMES:
            setattr(torch.Tensor, n, guard(n))
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def test_training_step_reads_nothing_back_to_the_host():
    """forward, backward, engine.step (grad norm, clip, fused AdamW with found_inf), the gated EMA and queuing the
    step results: no tensor value reaches the host (on a GPU each such read would be a device sync)."""
    from usp_scale.config import OptimConfig
    from usp_scale.engine import build_engine
    from usp_scale.training.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    model = H.engine_model()
    eng = build_engine(EngineConfig(name="local", precision="fp32"), model,
                       lambda m: build_optimizer(OptimConfig(fused=True), param_groups(m, 0.05), torch.device("cpu")),
                       clip_grad=1.0)
    ema = EMA(eng.weights.ema_sources(), 0.9)
    stats = DeferredStepStats(torch.device("cpu"))
    x, y = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
    for bad in (False, True, False):
        with _NoHostReads():
            loss = torch.nn.functional.cross_entropy(eng(x), y) * (float("nan") if bad else 1.0)
            eng.backward(loss)
            res = eng.step()
            ema.update(eng.weights.ema_sources(), gate=res.ok)
            stats.push(0, res.ok, res.norm)
    assert [v[0] for _, v, _ in stats.flush()] == [1.0, 0.0, 1.0]
    # the guard does catch a read: the host-decided path (foreach AdamW) reads the norm
    eng2 = build_engine(EngineConfig(name="local", precision="fp32"), H.engine_model(),
                        lambda m: build_optimizer(OptimConfig(fused=False), param_groups(m, 0.05), torch.device("cpu")))
    eng2.backward(torch.nn.functional.cross_entropy(eng2(x), y))
    with pytest.raises(AssertionError, match="host read"), _NoHostReads():
        eng2.step()


@pytest.mark.parametrize("model", ["MAE-tiny", "DiT-tiny/2", "SiT-tiny/2"])
def test_real_task_steps_read_nothing_back_to_the_host(model):
    """The real losses (MAE masking + norm-pix loss, DDPM with learned sigma, SiT velocity) and the engine step."""
    sys.path.insert(0, os.path.join(H.REPO, "benchmarks", "train"))
    from bench_step import make_step

    from usp_scale.config import JobConfig
    from usp_scale.runtime import init_runtime

    step, eng, _, _ = make_step(model, batch=4, compile_=False, kernels="auto", precision="fp32",
                                runtime=init_runtime(JobConfig(), device="cpu"), ac=False)
    assert eng.skips_on_device()
    with _NoHostReads():                       # from the first step on (no one-time set-up in the forward)
        for _ in range(3):
            res = step()
    assert res.applied
