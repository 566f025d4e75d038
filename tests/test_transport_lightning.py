"""LightningDiT's flow-matching options against readable references of its definitions (hustvl/LightningDiT
transport/ and models/lightningdit.py): logit-normal t, the cosine loss added to the MSE, the timestep shift of the
Euler grid, and sampling with the CFG interval and the 3-channel CFG (``forward_with_cfg``)."""
import math

import pytest
import torch
from scipy import stats

from usp_scale.models import create_model
from usp_scale.sample.model_fn import make_model_fn
from usp_scale.sample.samplers import build_sampler
from usp_scale.transport import Transport, create_transport, sample_time, time_grid


def _model(seed=0):
    torch.manual_seed(seed)
    m = create_model("LightningDiT-tiny/1", in_channels=8)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def test_logit_normal_time_is_the_sigmoid_of_a_standard_normal():
    t = sample_time(20000, generator=torch.Generator().manual_seed(0), kind="logit_normal")
    z = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, 1 / (1 + torch.exp(-z)))
    # its law: P(T <= s) = Phi(logit(s)), density peaked at 1/2
    ks = stats.kstest(t.double().numpy(), lambda s: stats.norm.cdf(torch.logit(torch.as_tensor(s)).numpy()))
    assert ks.pvalue > 1e-3, ks
    assert abs(float(t.median()) - 0.5) < 0.02 and 0.0 < float(t.min()) and float(t.max()) < 1.0
    with pytest.raises(ValueError, match="time sampling 'lognormal'"):
        sample_time(3, kind="lognormal")


def test_training_loss_with_cosine_term_equals_the_reference_with_gradients():
    model = _model()
    tr = create_transport("Linear", "velocity", time_sampling="logit_normal", cosine_loss=True)
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(3, 8, 4, 4, generator=g)
    y = torch.tensor([1, 4, 9])
    out = tr.training_losses(model, x1, dict(y=y), generator=torch.Generator().manual_seed(2))
    # the reference: t (logit-normal) then x0 from the same generator, x_t = t x1 + (1 - t) x0, u = x1 - x0
    g2 = torch.Generator().manual_seed(2)
    t = torch.sigmoid(torch.randn(3, generator=g2))
    x0 = torch.randn(x1.shape, generator=g2)
    tb = t.view(-1, 1, 1, 1)
    v = model(tb * x1 + (1 - tb) * x0, t, y)
    u = x1 - x0
    mse = ((v - u) ** 2).flatten(1).mean(1)
    cos = (v * u).sum(1) / (v.norm(dim=1) * u.norm(dim=1))          # per position, over the channels
    ref = mse + (1 - cos).flatten(1).mean(1)
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["cos_loss"], (1 - cos).flatten(1).mean(1))
    torch.testing.assert_close(out["loss"], ref)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(out["loss"].mean(), params), torch.autograd.grad(ref.mean(), params)):
        # fp32, two summation orders: gradient entries ~1e-3 differ by up to ~1e-7 (1 in 98,304 exceeded the earlier
        # atol 1e-7 with one thread); 1e-6 is still 10x below the default fp32 atol of assert_close
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    plain = Transport().training_losses(model, x1, dict(y=y), generator=torch.Generator().manual_seed(2))
    assert set(plain) == {"loss", "pred"}


def test_timestep_shift_grid():
    n = 250
    s = 0.3
    lin = [i / (n - 1) for i in range(n)]
    want = torch.tensor([s * t / (1 + (s - 1) * t) for t in lin], dtype=torch.float64)
    got = time_grid(0.0, 1.0, n - 1, s)                       # LightningDiT's 250 grid points = 249 steps
    torch.testing.assert_close(got, want)
    assert got[0] == 0 and abs(float(got[-1]) - 1) < 1e-12 and float(got[n // 2]) < 0.25   # crowded toward noise
    torch.testing.assert_close(time_grid(0.0, 1.0, 9, 0.0), torch.linspace(0, 1, 10, dtype=torch.float64))
    torch.testing.assert_close(time_grid(0.0, 1.0, 9, 1.0), torch.linspace(0, 1, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="timestep shift must be >= 0"):
        time_grid(0.0, 1.0, 9, -0.3)
    with pytest.raises(ValueError, match="dopri5 chooses its own steps"):
        Transport().sample_ode(lambda x, t, y: x, torch.zeros(1, 2), dict(y=torch.zeros(1)), timestep_shift=0.3)
    with pytest.raises(ValueError, match="sampler 'sde' takes none"):
        build_sampler("sde", Transport(), timestep_shift=0.3)


def _reference_sampler(model, z, y, num_steps, shift, scale, interval_start, null):
    """LightningDiT's sampling written out: Euler through the num_steps grid points shift(linspace(0, 1)), the
    velocity at the start of each step from forward_with_cfg: the conditional and unconditional outputs of the
    same x; channels 0-2 guided, uncond + scale * (cond - uncond), unless t < interval_start; the other channels
    conditional."""
    ts = [shift * (i / (num_steps - 1)) / (1 + (shift - 1) * (i / (num_steps - 1))) for i in range(num_steps)]
    x = z.clone()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        tt = torch.full((2 * len(x),), t0)
        out = model(torch.cat([x, x]), tt, torch.cat([y, torch.full_like(y, null)]))
        cond, uncond = out.chunk(2)
        v = cond.clone()
        if t0 >= interval_start:
            v[:, :3] = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
        x = x + (t1 - t0) * v
    return x


def test_euler_sampling_with_shift_cfg_interval_and_three_channel_guidance():
    model = _model(3)
    z = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([2, 7])
    n, shift, scale, start = 12, 0.3, 4.0, 0.11
    with torch.no_grad():
        ref = _reference_sampler(model, z, y, n, shift, scale, start, null=10)
        sampler = build_sampler("euler", Transport(), steps=n - 1, timestep_shift=shift)
        assert sampler.describe() == {"sampler": "euler", "steps": n - 1, "timestep_shift": shift}
        fn = make_model_fn(model, num_classes=10, cfg_scale=scale, cfg_channels=3, interval=(start, 1.0))
        ours = sampler(fn, z, y)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        # the default guides every channel: a different sampler, off unless asked for
        every = sampler(make_model_fn(model, num_classes=10, cfg_scale=scale, interval=(start, 1.0)), z, y)
        assert (every - ref)[:, 3:].abs().max() > 1e-2
        # the interval: guidance only from t = start on (the first, noisiest steps are conditional)
        no_interval = sampler(make_model_fn(model, num_classes=10, cfg_scale=scale, cfg_channels=3), z, y)
        assert (no_interval - ref).abs().max() > 1e-3
        assert math.isclose(float(time_grid(0, 1, n - 1, shift)[2]), 0.0625)   # < start: unguided steps exist
