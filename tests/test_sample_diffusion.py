"""DiT diffusion: schedule, loss pieces against explicit references, respacing, DDPM/DDIM samplers."""
import math

import numpy as np
import pytest
import torch

from _helpers_sample import GaussianEps
from usp_scale.diffusion import (GaussianDiffusion, create_diffusion, discretized_gaussian_log_likelihood,
                                 linear_beta_schedule, normal_kl, space_timesteps)


def test_schedule_is_linear_float64():
    d = create_diffusion("")
    assert d.num_timesteps == 1000 and d.betas.dtype == np.float64
    assert d.betas[0] == pytest.approx(1e-4, abs=0) and d.betas[-1] == pytest.approx(0.02, abs=1e-18)
    np.testing.assert_allclose(np.diff(d.betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    np.testing.assert_allclose(d.alphas_cumprod, np.cumprod(1 - d.betas), rtol=0)
    assert d.model_var_type == "learned_range"


def test_q_sample_matches_formula():
    d = create_diffusion("")
    x0, noise = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    t = torch.tensor([0, 10, 500, 998, 999])
    ac = torch.from_numpy(d.alphas_cumprod)[t].view(-1, 1, 1, 1)
    ref = (ac.sqrt() * x0.double() + (1 - ac).sqrt() * noise.double()).float()
    torch.testing.assert_close(d.q_sample(x0, t, noise), ref, rtol=1e-6, atol=1e-6)


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from conditioning the joint Gaussian, computed independently."""
    d = create_diffusion("")
    x0, xt = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    t = torch.tensor([1, 5, 300, 999])
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        ab_prev, a, b = d.alphas_cumprod[ti - 1], 1 - d.betas[ti], d.betas[ti]
        prec = 1 / (1 - ab_prev) + a / b
        m = (math.sqrt(ab_prev) * x0[i].double() / (1 - ab_prev) + math.sqrt(a) * xt[i].double() / b) / prec
        torch.testing.assert_close(mean[i].double(), m, rtol=1e-5, atol=1e-5)
        assert var[i].item() == pytest.approx(1 / prec, rel=1e-5)
        assert logvar[i].item() == pytest.approx(math.log(1 / prec), rel=1e-5)
    # t = 0: the clipped log-variance takes the t = 1 value
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]


def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.randn(100), torch.randn(100)
    lv1, lv2 = torch.randn(100), torch.randn(100)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-5, atol=1e-6)


def test_discretized_gaussian_likelihood():
    # explicit reference at interior, lower-edge and upper-edge bins (tanh-approximate CDF)
    def cdf(z):
        return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    mean, log_scale = 0.1, math.log(0.3)
    sd = math.exp(log_scale)
    for x in (0.2, -1.0, 1.0):
        if x == -1.0:
            ref = math.log(cdf((x - mean + 1 / 255) / sd))
        elif x == 1.0:
            ref = math.log(1 - cdf((x - mean - 1 / 255) / sd))
        else:
            ref = math.log(cdf((x - mean + 1 / 255) / sd) - cdf((x - mean - 1 / 255) / sd))
        got = discretized_gaussian_log_likelihood(torch.tensor([x]), torch.tensor([mean]), torch.tensor([log_scale]))
        assert got.item() == pytest.approx(ref, rel=1e-5)
    # the 256 bins of [-1, 1] hold all the probability mass
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, 0.3), torch.full_like(bins, math.log(0.2)))
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # close to the exact normal CDF
    exact = torch.special.ndtr((bins[100] - 0.3 + 1 / 255) / 0.2) - torch.special.ndtr((bins[100] - 0.3 - 1 / 255) / 0.2)
    assert lp[100].exp().item() == pytest.approx(exact.item(), rel=2e-3)


def _learned_range_logvar(d, t, v):
    lo = d.posterior_log_variance_clipped[t]
    hi = np.log(d.betas[t])
    f = (v + 1) / 2
    return f * hi + (1 - f) * lo


def test_training_losses_against_explicit_terms():
    torch.manual_seed(0)
    d = create_diffusion("")
    B, C = 6, 4
    x0 = torch.randn(B, C, 4, 4).clamp(-1, 1)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 0, 1, 17, 500, 999])
    out = torch.randn(B, 2 * C, 4, 4).clamp(-1, 1)
    out.requires_grad_(True)
    terms = d.training_losses(lambda x, tt, y=None: out, x0, t, {"y": None}, noise=noise)
    # mse
    mse = ((noise - out[:, :C]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["mse"], mse)
    # vb, explicitly: x_t, posterior, learned-range model variance
    xt = d.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        ac, ac_prev = d.alphas_cumprod[ti], d.alphas_cumprod_prev[ti]
        eps = out[i, :C].detach().double()
        x0_hat = (xt[i].double() - math.sqrt(1 - ac) * eps) / math.sqrt(ac)
        c1, c2 = d.posterior_mean_coef1[ti], d.posterior_mean_coef2[ti]
        model_mean = c1 * x0_hat + c2 * xt[i].double()
        model_logvar = _learned_range_logvar(d, ti, out[i, C:].detach().double())
        if ti == 0:
            lp = discretized_gaussian_log_likelihood(x0[i].double(), model_mean, 0.5 * model_logvar)
            ref = -lp.mean() / math.log(2)
        else:
            true_mean = c1 * x0[i].double() + c2 * xt[i].double()
            true_var = d.posterior_variance[ti]
            p = torch.distributions.Normal(true_mean, math.sqrt(true_var))
            q = torch.distributions.Normal(model_mean, (0.5 * model_logvar).exp())
            ref = torch.distributions.kl_divergence(p, q).mean() / math.log(2)
        # float32 tail-CDF differences limit the t = 0 agreement
        assert terms["vb"][i].item() == pytest.approx(ref.item(), rel=1e-3 if ti == 0 else 2e-4, abs=1e-6), ti
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # vb trains only the variance channels, mse only eps
    g_vb, = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert g_vb[:, :C].abs().max() == 0 and g_vb[:, C:].abs().max() > 0
    g_mse, = torch.autograd.grad(terms["mse"].sum(), out)
    assert g_mse[:, C:].abs().max() == 0


def test_learned_range_endpoints():
    d = create_diffusion("")
    x = torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 3, 999])
    for v, ref in ((-1.0, d.posterior_log_variance_clipped), (1.0, np.log(d.betas))):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1)
        lv = d.p_mean_variance(None, x, t, model_output=out)["log_variance"]
        torch.testing.assert_close(lv[:, 0, 0, 0].double(), torch.from_numpy(ref[t.numpy()]), rtol=1e-6, atol=1e-6)


def test_respacing_reproduces_alphas_cumprod():
    base = create_diffusion("")
    sp = create_diffusion("250")
    kept = [round(k * 999 / 249) for k in range(250)]
    assert space_timesteps(1000, "250") == kept and kept[0] == 0 and kept[-1] == 999
    assert sp.num_timesteps == 250
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    np.testing.assert_array_equal(sp.timestep_map, kept)
    # the same from respace() on either object
    np.testing.assert_allclose(base.respace("250").alphas_cumprod, sp.respace(250).alphas_cumprod, rtol=0)
    # ddim stride and sections
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(100, "3,2") == [0, 24, 49, 50, 99]
    with pytest.raises(ValueError):
        space_timesteps(100, "60,2")


def test_model_receives_original_timesteps_and_last_step_is_noiseless():
    sp = create_diffusion("10")
    model = GaussianEps([0.2], 0.5, create_diffusion("").alphas_cumprod)
    calls = []

    def noise_fn(x):
        calls.append(1)
        return torch.randn_like(x)
    y = torch.zeros(3, dtype=torch.long)
    sp.p_sample_loop(model, (3, 1, 2, 2), model_kwargs={"y": y}, noise_fn=noise_fn)
    seen = [int(t[0]) for t in model.seen_t]
    assert seen == [round(k * 999 / 9) for k in range(10)][::-1]
    assert len(calls) == 9  # no noise on the final step


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "ddim_eta1"])
def test_samplers_reach_gaussian_data(kind):
    mu, s = 0.6, 0.4
    base = create_diffusion("")
    model = GaussianEps([mu], s, base.alphas_cumprod, v=0.0)
    d = create_diffusion("100")
    z = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4000, dtype=torch.long)
    if kind == "ddpm":
        x = d.p_sample_loop(model, z.shape, noise=z, model_kwargs={"y": y})
    else:
        x = d.ddim_sample_loop(model, z.shape, noise=z, model_kwargs={"y": y},
                               eta=1.0 if kind == "ddim_eta1" else 0.0)
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(s, rel=0.1 if kind == "ddim_eta1" else 0.05)


def test_fixed_variance_and_bad_inputs():
    d = create_diffusion("", learn_sigma=False)
    assert d.model_var_type == "fixed_large"
    x0 = torch.randn(2, 4, 2, 2)
    terms = d.training_losses(lambda x, t: torch.zeros_like(x), x0, torch.tensor([3, 4]))
    assert "vb" not in terms and torch.equal(terms["loss"], terms["mse"])
    with pytest.raises(ValueError, match="output channels"):
        create_diffusion("").training_losses(lambda x, t: torch.zeros_like(x), x0, torch.tensor([3, 4]))
    with pytest.raises(ValueError):
        GaussianDiffusion(linear_beta_schedule(10), "learned")
