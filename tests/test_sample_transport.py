"""SiT transport: path, loss, score, and the ODE/SDE samplers on a model with exact velocity."""
import math

import pytest
import torch

from _helpers_sample import GaussianVelocity
from usp_scale.transport import create_transport, dopri5, heun


def test_path_and_loss():
    tr = create_transport()
    x1, x0 = torch.randn(5, 4, 2, 2), torch.randn(5, 4, 2, 2)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 0.999])
    xt = tr.interpolate(x0, x1, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], 0.5 * x0[2] + 0.5 * x1[2])
    pred = torch.randn(5, 8, 2, 2)  # learn_sigma output: the second half is ignored
    terms = tr.training_losses(lambda x, tt, y=None: pred, x1, {"y": None}, t=t, noise=x0)
    ref = ((pred[:, :4] - (x1 - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["loss"], ref)
    # default t ~ U[0, 1)
    seen = []
    tr.training_losses(lambda x, tt: (seen.append(tt), x)[1], torch.randn(4000, 1, 1, 1))
    assert 0 <= seen[0].min() and seen[0].max() < 1 and abs(seen[0].mean().item() - 0.5) < 0.03


def test_score_from_velocity_matches_gaussian_marginal():
    mu, s = 0.3, 0.7
    model = GaussianVelocity([mu], s)
    tr = create_transport()
    x = torch.randn(6, 1, 2, 2)
    t = torch.tensor([0.0, 0.1, 0.4, 0.6, 0.9, 0.95])
    v = model(x, t, torch.zeros(6, dtype=torch.long))
    score = tr.score_from_velocity(v, x, t)
    tb = t.view(-1, 1, 1, 1)
    var = tb ** 2 * s ** 2 + (1 - tb) ** 2
    torch.testing.assert_close(score, -(x - tb * mu) / var, rtol=1e-5, atol=1e-5)


def test_dopri5_exact_linear_ode_and_batch_independence():
    a = torch.tensor([-2.0, 0.5, 3.0, -0.1]).view(-1, 1)

    def f(x, t, rows):
        return (a if rows is None else a[rows]) * x
    x0 = torch.ones(4, 3)
    st = {}
    x1 = dopri5(f, x0, 0.0, 1.0, atol=1e-8, rtol=1e-6, stats=st)
    torch.testing.assert_close(x1, torch.exp(a).expand(4, 3), rtol=2e-5, atol=1e-6)
    assert st["calls"] > 8
    # per-sample step control: a row integrated alone gives the bit-identical result
    rows = []
    for i in range(4):
        rows.append(dopri5(lambda x, t, r: a[i:i + 1] * x, x0[i:i + 1], atol=1e-8, rtol=1e-6))
    assert torch.equal(torch.cat(rows), x1)


def test_heun_is_second_order():
    def f(x, t, rows):
        return torch.cos(t).view(-1, 1) * x
    x0 = torch.ones(1, 1, dtype=torch.float32)
    exact = math.exp(math.sin(1.0))
    e1 = abs(heun(f, x0, steps=10).item() - exact)
    e2 = abs(heun(f, x0, steps=20).item() - exact)
    assert 3.0 < e1 / e2 < 5.0


def test_ode_maps_noise_to_data_exactly():
    """For Gaussian data the probability-flow ODE of the linear path maps z to mu + s z."""
    s = 0.5
    model = GaussianVelocity([0.7, -0.4], s)
    tr = create_transport()
    z = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.arange(256) % 2  # per-row labels must follow the rows dopri5 keeps integrating
    mu = model.mus[y].view(-1, 1, 1, 1)
    x = tr.sample_ode(model, z, {"y": y}, method="dopri5")  # SiT's tolerances: atol 1e-6, rtol 1e-3
    torch.testing.assert_close(x, mu + s * z, rtol=0, atol=2e-2)
    x = tr.sample_ode(model, z, {"y": y}, method="dopri5", rtol=1e-5)
    torch.testing.assert_close(x, mu + s * z, rtol=0, atol=2e-4)
    x = tr.sample_ode(model, z, {"y": y}, method="heun", steps=25)
    torch.testing.assert_close(x, mu + s * z, rtol=0, atol=5e-3)


def test_sde_reaches_data_distribution_with_250_calls():
    mus, s = [-0.5, 0.8], 0.3
    model = GaussianVelocity(mus, s, out_channels_factor=2)  # 8-channel SiT output: second half dropped
    tr = create_transport()
    n = 3000
    z = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    y = torch.arange(n) % 2
    g = torch.Generator().manual_seed(2)
    x = tr.sample_sde(model, z, {"y": y}, steps=250, noise_fn=lambda a: torch.randn(a.shape, generator=g))
    assert model.calls == 250
    for c in (0, 1):
        xc = x[y == c]
        assert xc.mean().item() == pytest.approx(mus[c], abs=0.02)
        assert xc.std().item() == pytest.approx(s, rel=0.06)


def test_bad_transport_arguments():
    with pytest.raises(ValueError):
        create_transport("GVP")
    tr = create_transport()
    with pytest.raises(ValueError):
        tr.sample_ode(lambda x, t: x, torch.zeros(1, 1), method="rk4")
    with pytest.raises(ValueError):
        tr.sample_sde(lambda x, t: x, torch.zeros(1, 1), steps=1)
