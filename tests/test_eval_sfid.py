"""sFID: the spatial Inception features (ADM's mixed_6/conv, 7 channels, (h, w, c) order), the metric through
compute_metrics, and reference statistics files with ADM's mu_s / sigma_s."""
import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as TFI

from usp_scale.eval import compute_metrics, create_extractor, extract_features, frechet_distance, save_statistics, \
    statistics
from usp_scale.eval.features import INCEPTION_NAME, INCEPTION_SPATIAL, default_layer


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A weights file in torch-fidelity's layout with random values (the real file cannot be downloaded here);
    no hash in its name (a name with torch-fidelity's hash must match the file's sha256)."""
    from usp_scale.eval.inception import Inception2015

    torch.manual_seed(0)
    net = Inception2015()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.normal_(0, 0.05 if name.endswith("conv.weight") else 0.2)
        for name, b in net.named_buffers():                  # BN statistics off their identity defaults
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def test_spatial_features_of_the_inception_extractor(random_inception_weights):
    ims = torch.from_numpy(np.random.RandomState(0).randint(0, 256, (3, 40, 40, 3)).astype(np.uint8))
    x = ims.permute(0, 3, 1, 2)
    ext = create_extractor(INCEPTION_NAME, ["2048", INCEPTION_SPATIAL], "cpu", random_inception_weights)
    grabbed = {}
    ext.Mixed_6d.register_forward_hook(lambda m, i, o: grabbed.setdefault("mixed_6d", o))
    pool, spatial = ext(x)
    assert spatial.shape == (3, 17 * 17 * 7) and spatial.dtype == torch.float32
    # the 1x1-conv branch is the first 192 channels of the Mixed_6d output (TF's concat order); (h, w, c) order
    ref = grabbed["mixed_6d"][:, :7].permute(0, 2, 3, 1).reshape(3, -1)
    assert torch.equal(spatial, ref)
    assert (spatial >= 0).all()                                 # after ReLU, as TF's mixed_6/conv
    # every other feature is the parent's, bit for bit
    plain = TFI.FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=random_inception_weights)
    assert torch.equal(plain(x)[0], pool)
    # the adm protocol's implementation of the same network gives the same features to float rounding
    adm = create_extractor(INCEPTION_NAME, ["2048", INCEPTION_SPATIAL], "cpu", random_inception_weights, protocol="adm")
    pool_a, spatial_a = adm(x)
    torch.testing.assert_close(pool_a, pool, rtol=1e-5, atol=1e-5 * pool.abs().max().item())
    torch.testing.assert_close(spatial_a, spatial, rtol=1e-5, atol=1e-5 * spatial.abs().max().item())
    # spatial alone (the parent would stop before Mixed_6d for early features)
    only = create_extractor(INCEPTION_NAME, [INCEPTION_SPATIAL, "64"], "cpu", random_inception_weights)
    sp2, f64 = only(x)
    assert torch.equal(sp2, spatial) and f64.shape == (3, 64)
    assert default_layer(INCEPTION_NAME, "sfid") == INCEPTION_SPATIAL


def test_sfid_metric_and_statistics_files(tmp_path):
    rng = np.random.RandomState(1)
    ref = rng.randint(0, 256, (40, 16, 16, 3)).astype(np.uint8)
    gen = np.clip(ref.astype(int) // 2 + 20, 0, 255).astype(np.uint8)
    kw = dict(feature_extractor="usp-tiny", progress=False, cache_dir=str(tmp_path / "cache"))
    r = compute_metrics(gen, ref, ("fid", "sfid"), **kw)
    # a set against itself: 0 up to the sqrtm error of a rank-deficient covariance (448 dims, 40 samples)
    assert abs(compute_metrics(ref, ref, ("sfid",), **kw)["sfid"]) < 1e-4 * r["sfid"]
    ext = create_extractor("usp-tiny", ["pool", "spatial"])
    fg, fr = extract_features(gen, ext, progress=False), extract_features(ref, ext, progress=False)
    assert fg["spatial"].shape == (40, 8 * 8 * 7)
    want = frechet_distance(statistics(fg["spatial"]), statistics(fr["spatial"]))
    assert r["sfid"] == pytest.approx(want, rel=1e-9) and r["sfid"] > 1e-3
    assert r["fid"] == pytest.approx(frechet_distance(statistics(fg["pool"]), statistics(fr["pool"])), rel=1e-9)
    # a statistics file with ADM's mu_s / sigma_s gives the same sFID without images
    both = save_statistics(str(tmp_path / "both.npz"), fr["pool"], fr["spatial"])
    with np.load(both) as d:
        assert sorted(d.files) == ["mu", "mu_s", "sigma", "sigma_s"]
    r2 = compute_metrics(gen, both, ("fid", "sfid"), **kw)
    assert r2["sfid"] == pytest.approx(r["sfid"], rel=1e-9) and r2["fid"] == pytest.approx(r["fid"], rel=1e-9)
    fid_only = save_statistics(str(tmp_path / "fid_only.npz"), fr["pool"])
    with pytest.raises(ValueError, match="mu_s"):
        compute_metrics(gen, fid_only, ("sfid",), **kw)


def test_sfid_needs_spatial_features():
    with pytest.raises(KeyError, match="spatial"):
        default_layer("some-other-extractor", "sfid")
