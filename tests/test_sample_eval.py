"""Metrics: FID against scipy, IS edge cases, KID/PR, reference statistics and caching, records,
the in-training FID hook and the evaluate/sample launchers' CLIs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from _helpers_sample import GaussianVelocity
from usp_scale.eval import (compute_metrics, evaluate_fid, frechet_distance, inception_score, make_records,
                            precision_recall, resolve_inception_weights, save_statistics, statistics, write_records)
from usp_scale.sample import write_npz, write_png
from usp_scale.transport import create_transport

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy():
    rng = np.random.RandomState(0)
    for d in (2, 16):
        a = rng.randn(d, d)
        b = rng.randn(d, d)
        s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
        mu1, mu2 = rng.randn(d), rng.randn(d)
        got = frechet_distance({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2})
        assert got == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-6)
    # statistics of samples from two Gaussians
    x = torch.from_numpy(rng.randn(500, 8))
    y = torch.from_numpy(rng.randn(500, 8) * 1.5 + 0.3)
    sx, sy = statistics(x), statistics(y)
    np.testing.assert_allclose(sx["sigma"], np.cov(x.numpy(), rowvar=False), rtol=1e-10)
    assert frechet_distance(sx, sy) == pytest.approx(_scipy_fid(sx["mu"], sx["sigma"], sy["mu"], sy["sigma"]), rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero(tmp_path):
    ims = np.random.RandomState(0).randint(0, 256, (40, 16, 16, 3)).astype(np.uint8)
    r = compute_metrics(ims, ims, ("fid", "kid", "pr"), feature_extractor="usp-tiny", progress=False,
                        cache_dir=str(tmp_path))
    assert abs(r["fid"]) < 1e-6
    assert r["precision"] == 1.0 and r["recall"] == 1.0 and r["num_samples"] == 40
    other = np.clip(ims.astype(int) // 2, 0, 255).astype(np.uint8)  # darker images
    r2 = compute_metrics(other, ims, ("fid", "kid"), feature_extractor="usp-tiny", progress=False)
    assert r2["fid"] > 1e-3
    # KID is an unbiased estimate: about 0 (possibly slightly negative) for identical sets
    assert abs(r["kid_mean"]) < 0.05 * r2["kid_mean"]


def test_generator_source_equals_array_source():
    ims = np.random.RandomState(5).randint(0, 256, (30, 16, 16, 3)).astype(np.uint8)
    ref = np.random.RandomState(6).randint(0, 256, (30, 16, 16, 3)).astype(np.uint8)
    gen = ((list(range(i, i + 7)), ims[i:i + 7], None) for i in range(0, 30, 7))  # generate_batches-style tuples
    kw = dict(metrics=("fid", "is"), feature_extractor="usp-tiny", progress=False)
    a = compute_metrics(gen, ref, **kw)
    b = compute_metrics(ims, ref, **kw)
    assert a["num_samples"] == 30 and a["fid"] == pytest.approx(b["fid"], rel=1e-6)
    assert a["is_mean"] == pytest.approx(b["is_mean"], rel=1e-9)


def test_inception_score_edge_cases():
    assert inception_score(torch.zeros(100, 10))["is_mean"] == pytest.approx(1.0, abs=1e-9)  # uniform classifier
    confident = torch.nn.functional.one_hot(torch.arange(100) % 10, 10).double() * 50  # sure and balanced
    assert inception_score(confident, splits=1)["is_mean"] == pytest.approx(10.0, rel=1e-6)


def test_precision_recall_against_brute_force():
    rng = np.random.RandomState(1)
    gen = torch.from_numpy(rng.randn(60, 5)).float()
    ref = torch.from_numpy(rng.randn(50, 5) + 0.5).float()

    def radii(x):
        d = torch.cdist(x, x)
        return d.sort(dim=1).values[:, 3]  # 3rd neighbour (index 0 is the point itself)
    def covered(q, x):
        return (torch.cdist(q, x) <= radii(x)[None]).any(1).float().mean().item()
    r = precision_recall(gen, ref, k=3)
    assert r["precision"] == pytest.approx(covered(gen, ref)) and r["recall"] == pytest.approx(covered(ref, gen))


def test_references_folder_npz_stats_and_cache(tmp_path, monkeypatch):
    rng = np.random.RandomState(2)
    ref = rng.randint(0, 256, (30, 16, 16, 3)).astype(np.uint8)
    gen = rng.randint(0, 200, (25, 16, 16, 3)).astype(np.uint8)
    os.makedirs(tmp_path / "ref")
    for i, im in enumerate(ref):
        write_png(str(tmp_path / "ref" / f"{i:06d}.png"), im)
    write_npz(str(tmp_path / "ref.npz"), ref)
    cache = str(tmp_path / "cache")
    kw = dict(feature_extractor="usp-tiny", progress=False, cache_dir=cache)
    f_arr = compute_metrics(gen, ref, ("fid",), **kw)["fid"]
    f_dir = compute_metrics(gen, str(tmp_path / "ref"), ("fid",), **kw)["fid"]
    f_npz = compute_metrics(gen, str(tmp_path / "ref.npz"), ("fid",), **kw)["fid"]
    assert f_dir == pytest.approx(f_arr, rel=1e-6) and f_npz == pytest.approx(f_arr, rel=1e-6)
    assert len(os.listdir(cache)) == 2  # one cached feature file per reference path
    # precomputed statistics (.npz with mu, sigma)
    from usp_scale.eval import create_extractor, extract_features
    feats = extract_features(ref, create_extractor("usp-tiny", ["pool"]), progress=False)["pool"]
    stats = save_statistics(str(tmp_path / "stats.npz"), feats)
    assert compute_metrics(gen, stats, ("fid",), **kw)["fid"] == pytest.approx(f_arr, rel=1e-6)
    with pytest.raises(ValueError, match="only statistics"):
        compute_metrics(gen, stats, ("fid", "pr"), **kw)
    # a cached reference is not recomputed
    import usp_scale.eval.metrics as M
    monkeypatch.setattr(M, "extract_features", lambda src, *a, **k: (_ for _ in ()).throw(AssertionError)
                        if isinstance(src, str) else extract_features(src, *a, **k))
    assert compute_metrics(gen, str(tmp_path / "ref.npz"), ("fid",), **kw)["fid"] == pytest.approx(f_arr, rel=1e-6)


def test_missing_inception_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth") as e:
        resolve_inception_weights(str(tmp_path / "nowhere"))
    assert str(tmp_path / "hub" / "checkpoints") in str(e.value)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"x")
    assert resolve_inception_weights(str(tmp_path / "w")).endswith(".pth")


def test_records_carry_context(tmp_path):
    ctx = {"protocol": "torch-fidelity", "sampler": "sde", "steps": 250, "cfg_scale": 1.0,
           "sampling_precision": "bf16", "reference": "ref.npz", "feature_extractor": "usp-tiny"}
    recs = make_records({"fid": 3.2, "precision": 0.7, "num_samples": 100}, ctx)
    assert {r["metric"] for r in recs} == {"fid", "precision"}
    for r in recs:
        assert r["num_samples"] == 100 and all(r[k] == v for k, v in ctx.items())
    write_records(str(tmp_path / "m.jsonl"), recs)
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["value"] == 3.2
    assert "fid=3.2 protocol=torch-fidelity num_samples=100 sampler=sde steps=250" in (tmp_path / "m.txt").read_text()
    assert json.loads(lines[0])["protocol"] == "torch-fidelity"
    with pytest.raises(ValueError, match="context"):
        make_records({"fid": 1.0}, {"sampler": "sde"})


class _ToyNet(torch.nn.Module):
    """nn.Module face of the exact-velocity toy (pixel space, 4 classes)."""

    def __init__(self, mus):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.f = GaussianVelocity(mus, 0.2)
        self.in_channels = 3

    def forward(self, x, t, y):
        return self.f(x, t, y) + self.w


def test_evaluate_fid_hook(tmp_path):
    mus = [-0.6, -0.2, 0.2, 0.6]
    # reference: exact samples of the data distribution
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (64,), generator=g)
    ref = torch.tensor(mus)[y].view(-1, 1, 1, 1) + 0.2 * torch.randn(64, 3, 8, 8, generator=g)
    ref_u8 = torch.clamp(127.5 * ref + 128, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    write_npz(str(tmp_path / "ref.npz"), ref_u8)
    cfg = {"sampler": "sde", "steps": 20, "batch_size": 16, "feature_extractor": "usp-tiny",
           "fid_reference": str(tmp_path / "ref.npz")}
    net = _ToyNet(mus).train()
    kw = dict(latent_shape=(3, 8, 8), num_classes=4, cache_dir=str(tmp_path / "c"), device="cpu")
    good = evaluate_fid(net, create_transport(), None, cfg, 64, records_file=str(tmp_path / "m.jsonl"), step=7, **kw)
    assert net.training  # restored
    rec = json.loads((tmp_path / "m.jsonl").read_text())
    assert rec["metric"] == "fid" and rec["value"] == good["fid"] and rec["step"] == 7 and rec["num_samples"] == 64
    bad = evaluate_fid(_ToyNet([0.9, 0.9, 0.9, 0.9]), create_transport(), None, cfg, 64, **kw)
    # with the extractor built beforehand (as the training hook does), an evaluation (reference cached, SDE
    # noise included) draws nothing from the global generator: training's random stream cannot move
    from usp_scale.eval import build_extractor
    ext = build_extractor(cfg, "cpu")
    before = torch.get_rng_state()
    again = evaluate_fid(net, create_transport(), None, cfg, 64, extractor=ext, **kw)
    assert torch.equal(torch.get_rng_state(), before) and again["fid"] == good["fid"]
    assert good["num_samples"] == 64 and good["sampler"] == "sde" and good["steps"] == 20
    assert good["fid"] < 0.5 * bad["fid"]
    with pytest.raises(ValueError, match="reference"):
        evaluate_fid(net, create_transport(), None, dict(cfg, fid_reference=""), 8, **kw)
    # the sample grid for watching a run: same images on every call
    from usp_scale.eval import save_sample_grid
    from usp_scale.sample import read_png
    p1 = save_sample_grid(net, create_transport(), None, cfg, str(tmp_path / "g1.png"), num=9,
                          latent_shape=(3, 8, 8), num_classes=4)
    p2 = save_sample_grid(net, create_transport(), None, cfg, str(tmp_path / "g2.png"), num=9,
                          latent_shape=(3, 8, 8), num_classes=4)
    g1 = read_png(p1)
    assert g1.shape == (3 * 10 + 2, 3 * 10 + 2, 3) and np.array_equal(g1, read_png(p2)) and net.training


def test_evaluate_launcher_end_to_end(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "launchers"))
    try:
        import evaluate as ev
    finally:
        sys.path.pop(0)
    rng = np.random.RandomState(3)
    os.makedirs(tmp_path / "s")
    for i in range(20):
        write_png(str(tmp_path / "s" / f"{i:06d}.png"), rng.randint(0, 256, (16, 16, 3)).astype(np.uint8))
    write_png(str(tmp_path / "s" / "grid.png"), np.zeros((40, 40, 3), np.uint8))  # not a sample: ignored
    (tmp_path / "s" / "sampling.json").write_text(json.dumps({"sampler": "ddpm", "steps": 250, "cfg_scale": 1.5,
                                                             "sampling_precision": "bf16"}))
    write_npz(str(tmp_path / "ref.npz"), rng.randint(0, 256, (20, 16, 16, 3)).astype(np.uint8))
    recs = ev.main(["--samples", str(tmp_path / "s"), "--reference", str(tmp_path / "ref.npz"), "--metrics", "fid",
                    "sfid", "is", "kid", "pr", "--feature-extractor", "usp-tiny", "--no-progress",
                    "--cache-dir", str(tmp_path / "c")])
    assert {r["metric"] for r in recs} == {"fid", "sfid", "is_mean", "is_std", "kid_mean", "kid_std", "precision",
                                           "recall"}
    assert all(r["sampler"] == "ddpm" and r["cfg_scale"] == 1.5 and r["num_samples"] == 20 for r in recs)
    assert len((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()) == 8
    ev.main(["--save-stats", str(tmp_path / "st.npz"), "--reference", str(tmp_path / "ref.npz"),
             "--feature-extractor", "usp-tiny", "--no-progress", "--cache-dir", str(tmp_path / "c")])
    assert set(np.load(tmp_path / "st.npz").keys()) == {"mu", "sigma", "mu_s", "sigma_s"}   # FID and sFID statistics
    again = ev.main(["--samples", str(tmp_path / "s"), "--reference", str(tmp_path / "st.npz"), "--metrics", "fid",
                     "sfid", "--feature-extractor", "usp-tiny", "--no-progress", "--cache-dir", str(tmp_path / "c")])
    by = {r["metric"]: r["value"] for r in recs}
    assert {r["metric"]: r["value"] for r in again} == pytest.approx({"fid": by["fid"], "sfid": by["sfid"]}, rel=1e-9)


@pytest.mark.parametrize("script", ["sample.py", "evaluate.py"])
def test_launcher_help(script):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", script), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--out" in out.stdout
