"""VA-VAE latents (issue 21): a 32-channel x16 latent cache, its channel statistics (latent_stats.json) against an
fp64 reference and against posterior draws, the (z - mean) / std * multiplier normalisation on the encode side
(cache loader, online encoder) and its inverse on the decode side, LightningDiT's latents_stats.pt format, and the
refusals (edited statistics, another VAE's statistics, a channel count that does not fit)."""
import json
import os

import pytest
import torch

from _helpers_data import REPO  # noqa: F401
from usp_scale.config import DataConfig, VAEConfig
from usp_scale.data import LatentCache, build_dataset, build_loader, write_cache, write_manifest
from usp_scale.data.latent_stats import compute_latent_stats, pick_records, write_latent_stats
from usp_scale.vae import FrozenVAE
from usp_scale.vae.frozen import posterior_latents
from usp_scale.vae.latent_norm import LatentNorm, LatentStatsError, build_latent_norm, read_latent_stats

SIZE = 64  # x16 -> 4x4 latents of 32 channels


@pytest.fixture(scope="module")
def vavae():
    return FrozenVAE(path="tiny-random", version="f16d32")


@pytest.fixture(scope="module")
def vcache(vavae, tmp_path_factory):
    from usp_scale.data.synthetic import make_synthetic
    root = str(tmp_path_factory.mktemp("synth16"))
    make_synthetic(root, classes=3, per_class=4, size=SIZE, val_per_class=1, seed=2)
    out = str(tmp_path_factory.mktemp("cache16"))
    write_cache(build_dataset(root, "train"), vavae, out, image_size=SIZE, augment="adm", views=2, seed=1,
                dtype="fp16", shard_size=5, batch_size=8, progress=False)
    write_manifest(out)
    return {"path": out, "root": root}


def _all_moments(cache):
    n, v = len(cache), cache.views
    idx = torch.arange(n).repeat_interleave(2 * v).numpy()
    slot = torch.arange(2 * v).repeat(n).numpy()
    mean, logvar, _, _ = cache.gather(idx, slot // 2, slot % 2)
    return mean.double(), logvar.double()


def test_cache_of_32_channel_x16_latents(vcache, vavae):
    cache = LatentCache(vcache["path"])
    assert cache.latent_shape == (32, 4, 4) and len(cache) == 12 and cache.views == 2
    assert cache.manifest["vae"]["version"] == "f16d32" and cache.manifest["vae"]["latent_channels"] == 32
    cache.check(image_size=SIZE, vae_version="f16d32", vae_content=vavae.content_fingerprint,
                latent_shape=vavae.latent_shape(SIZE))


def test_statistics_over_the_whole_cache_equal_an_fp64_reference(vcache):
    st = write_latent_stats(vcache["path"], num_samples=0, seed=0)
    cache = LatentCache(vcache["path"])
    mean, logvar = _all_moments(cache)                                  # (R, 32, 4, 4) fp64
    assert st["samples"] == st["records_total"] == len(cache) * 4
    ref_mu = mean.mean((0, 2, 3))
    ref_var_means = mean.transpose(0, 1).reshape(32, -1).var(1)         # unbiased, as torch.std
    ref_std = (ref_var_means + logvar.clamp(-30, 20).exp().mean((0, 2, 3))).sqrt()
    torch.testing.assert_close(torch.tensor(st["mean"], dtype=torch.float64), ref_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(st["std_of_means"], dtype=torch.float64), ref_var_means.sqrt(),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.tensor(st["std"], dtype=torch.float64), ref_std, rtol=1e-9, atol=1e-12)
    # the file beside the manifest: tied to it and to the VAE, content-hashed
    d = json.load(open(os.path.join(vcache["path"], "latent_stats.json")))
    man = json.load(open(os.path.join(vcache["path"], "manifest.json")))
    assert d["cache_manifest_sha256"] == man["manifest_sha256"] and d["vae"] == man["vae"]
    assert "stats_sha256" in d and d["channels"] == 32


def test_statistics_describe_the_posterior_samples_the_loader_draws(vcache):
    """The analytic std (Var[mean] + E[exp(logvar)]) is that of real posterior draws, as the loader makes them."""
    st = write_latent_stats(vcache["path"], num_samples=0, seed=0)
    mean, logvar = _all_moments(LatentCache(vcache["path"]))
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([posterior_latents(mean.float(), logvar.float(), 1.0, sample=True, generator=g)
                       for _ in range(200)])
    emp = draws.double().transpose(0, 1).reshape(32, -1).std(1)
    torch.testing.assert_close(emp, torch.tensor(st["std"], dtype=torch.float64), rtol=0.02, atol=0)


def test_random_subset_is_seeded_and_recorded(vcache):
    cache = LatentCache(vcache["path"])
    a = compute_latent_stats(cache, num_samples=10, seed=3)
    b = compute_latent_stats(cache, num_samples=10, seed=3)
    c = compute_latent_stats(cache, num_samples=10, seed=4)
    assert a == b and a["mean"] != c["mean"] and a["samples"] == 10 and a["seed"] == 3
    recs = pick_records(48, 10, 3)
    assert len(set(recs.tolist())) == 10 and recs.max() < 48
    assert pick_records(48, 10000, 0).tolist() == list(range(48))  # more asked than stored: every latent


def test_loader_normalises_with_the_statistics(vcache):
    write_latent_stats(vcache["path"], num_samples=0, seed=0)
    dcfg = DataConfig(format="latents", latent_cache=vcache["path"], image_size=SIZE, batch_size=6, num_workers=0,
                      latent_sample=False, augment="adm")
    vcfg = VAEConfig(path="tiny-random", version="f16d32", latent_stats=vcache["path"], latent_multiplier=1.5)
    batch = next(iter(build_loader(dcfg, vcfg, seed=0)))
    raw = next(iter(build_loader(dcfg, VAEConfig(path="tiny-random", version="f16d32"), seed=0)))  # scale 1.0
    st = read_latent_stats(vcache["path"])
    m, s = st["mean"].float().view(1, -1, 1, 1), st["std"].float().view(1, -1, 1, 1)
    torch.testing.assert_close(batch["latents"], (raw["latents"] - m) / s * 1.5)
    assert torch.equal(batch["labels"], raw["labels"])


def test_encode_decode_use_the_same_normalisation(vcache):
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    plain = FrozenVAE(path="tiny-random", version="f16d32")
    normed = FrozenVAE(path="tiny-random", version="f16d32", latent_stats=vcache["path"], latent_multiplier=2.0)
    st = read_latent_stats(vcache["path"])
    m, s = st["mean"].float().view(1, -1, 1, 1), st["std"].float().view(1, -1, 1, 1)
    z_raw, z = plain.encode(x), normed.encode(x)
    torch.testing.assert_close(z, (z_raw - m) / s * 2.0)
    torch.testing.assert_close(normed.decode(z), plain.decode(z_raw), rtol=1e-4, atol=1e-4)
    # the config path (the online loader and the in-training FID build their VAE this way) carries the statistics
    from_cfg = FrozenVAE.from_config(VAEConfig(path="tiny-random", version="f16d32", latent_stats=vcache["path"],
                                               latent_multiplier=2.0))
    torch.testing.assert_close(from_cfg.encode(x), z)
    # sampling the posterior: the same noise, the same normalisation
    za = normed.encode(x, posterior="sample", generator=torch.Generator().manual_seed(1))
    zb = plain.encode(x, posterior="sample", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(za, (zb - m) / s * 2.0)


def test_scale_path_is_unchanged_bit_for_bit():
    """Without statistics the normalisation is the scale factor, computed exactly as before."""
    z = torch.randn(2, 4, 3, 3)
    n = LatentNorm(scale=0.18215)
    assert torch.equal(n.apply(z.clone()), z * 0.18215) and torch.equal(n.invert(z), z / 0.18215)
    lv = torch.randn(2, 4, 3, 3)
    a = posterior_latents(z, lv, n, sample=True, generator=torch.Generator().manual_seed(0))
    b = posterior_latents(z, lv, 0.18215, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_lightningdit_latents_stats_pt_loads(tmp_path):
    mean, std = torch.randn(1, 32, 1, 1), torch.rand(1, 32, 1, 1) + 0.5
    p = str(tmp_path / "latents_stats.pt")
    torch.save({"mean": mean, "std": std}, p)  # the reference's torch.save of its dict
    n = build_latent_norm(1.0, p, 1.0, channels=32)
    z = torch.randn(3, 32, 2, 2)
    torch.testing.assert_close(n.apply(z.clone()), (z - mean) / std)
    torch.testing.assert_close(n.invert(n.apply(z.clone())), z, rtol=1e-5, atol=1e-5)
    torch.save({"mean": mean}, p)
    with pytest.raises(LatentStatsError, match="latents_stats.pt.*mean.*std"):
        read_latent_stats(p)


def test_bad_statistics_are_refused(vcache, tmp_path):
    write_latent_stats(vcache["path"], num_samples=0, seed=0)
    path = os.path.join(vcache["path"], "latent_stats.json")
    # an edited value
    d = json.load(open(path))
    d["std"][0] *= 2
    bad = str(tmp_path / "latent_stats.json")
    json.dump(d, open(bad, "w"))
    with pytest.raises(LatentStatsError, match="vae.latent_stats"):
        read_latent_stats(bad)
    # another VAE's statistics (the content fingerprint the file records differs)
    with pytest.raises(LatentStatsError, match="content fingerprint"):
        FrozenVAE(path="tiny-random", version="f16d32", seed=1, latent_stats=vcache["path"])
    # statistics of 32 channels for a 4-channel VAE
    with pytest.raises(LatentStatsError, match="32 channels.*have 4"):
        FrozenVAE(path="tiny-random", version="d8", latent_stats=vcache["path"])
    # a cache without statistics names the key and the command that writes them
    empty = tmp_path / "cache_without"
    empty.mkdir()
    with pytest.raises(LatentStatsError, match=r"vae.latent_stats=.*no latent_stats.json.*cache_latents.py"):
        read_latent_stats(str(empty))


def test_stale_statistics_of_a_rewritten_cache_are_refused(vcache, tmp_path):
    """latent_stats.json records the manifest it was computed for; a cache whose manifest was rewritten after it
    (valid checksum, other content) is refused at read, naming the statistics and the manifest; recomputing them
    (what cache_latents.py does on a rerun) makes the cache usable again."""
    import shutil

    from usp_scale.checkpoint.safe_load import write_checked_json

    cache = str(tmp_path / "cache")
    shutil.copytree(vcache["path"], cache)
    write_latent_stats(cache, num_samples=0, seed=0)
    assert read_latent_stats(cache)["mean"].numel() == 32          # fresh: accepted
    man_path = os.path.join(cache, "manifest.json")
    man = json.load(open(man_path))
    man.pop("manifest_sha256")
    man["created"] = "2000-01-01T00:00:00Z"                        # the manifest rewritten after the statistics
    write_checked_json(man_path, man, key="manifest_sha256")
    stats = os.path.join(cache, "latent_stats.json")
    for p in (cache, stats):                                        # the folder or the file itself
        with pytest.raises(LatentStatsError, match=r"vae.latent_stats=.*latent_stats.json: stale statistics.*"
                                                   r"manifest.json now has .*cache_latents.py"):
            read_latent_stats(p)
    with pytest.raises(LatentStatsError, match="stale statistics"):
        FrozenVAE(path="tiny-random", version="f16d32", latent_stats=cache)
    # the same file copied out of the cache folder describes no cache on its own: not checked there
    out = tmp_path / "elsewhere"
    out.mkdir()
    shutil.copy(stats, out / "latent_stats.json")
    assert read_latent_stats(str(out / "latent_stats.json"))["mean"].numel() == 32
    write_latent_stats(cache, num_samples=0, seed=0)                # recomputed for the current manifest
    assert read_latent_stats(cache)["meta"]["cache_manifest_sha256"] == json.load(open(man_path))["manifest_sha256"]


def test_cache_launcher_writes_the_statistics(vcache, tmp_path):
    import sys
    sys.path.insert(0, os.path.join(REPO, "launchers"))
    import cache_latents

    out = str(tmp_path / "c")
    cache_latents.main(["--data-root", vcache["root"], "--out", out, "--image-size", str(SIZE), "--augment", "adm",
                        "--vae-path", "tiny-random", "--vae-version", "f16d32", "--shard-size", "6",
                        "--batch-size", "8", "--no-progress", "--num-workers", "0", "--stats-samples", "7",
                        "--seed", "5"])
    d = read_latent_stats(out)
    assert d["meta"]["samples"] == 7 and d["meta"]["seed"] == 5 and d["meta"]["records_total"] == 24
    assert d["mean"].shape == (32,)


def test_trainer_refuses_statistics_that_do_not_fit(vcache, tmp_path, capsys):
    """A latents_stats.pt of 16 channels for a 32-channel cache: the trainer stops with the message, nothing trains."""
    from usp_scale.training.cli import main

    p = str(tmp_path / "latents_stats.pt")
    torch.save({"mean": torch.zeros(1, 16, 1, 1), "std": torch.ones(1, 16, 1, 1)}, p)
    rc = main(["--config", os.path.join(REPO, "configs", "debug", "synthetic_pretrain.yaml"),
               f"output_dir={tmp_path / 'run'}", "model.name=LightningMAE-tiny/1", "data.format=latents", "data.augment=adm",
               f"data.latent_cache={vcache['path']}", f"data.image_size={SIZE}", "vae.path=tiny-random",
               "vae.version=f16d32", f"vae.latent_stats={p}", "model.img_size=4", "model.in_chans=32",
               "schedule.max_steps=1", "engine.precision=fp32"])
    err = capsys.readouterr().err
    assert rc == 3 and "vae.latent_stats" in err and "16 channels" in err and "have 32" in err
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
