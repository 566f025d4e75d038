"""Latent cache: write -> read round trip, view/flip selection, crash-and-resume, checksums, manifest checks,
two ranks with torchrun (gloo), reader resume, and the build_loader contract (cache and online)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from _helpers_data import REPO, data_cfg, free_port, synth, synth_clean  # noqa: F401
from usp_scale.config import VAEConfig
from usp_scale.data import (LatentCache, LatentCacheError, build_dataset, build_loader, write_cache,
                            write_manifest)
from usp_scale.data.transforms import build_transform, sample_seed, seeded
from usp_scale.vae import FrozenVAE

ARGS = dict(image_size=32, augment="pretrain", views=2, seed=11, dtype="fp16", shard_size=10, batch_size=8,
            progress=False)


@pytest.fixture(scope="module")
def vae():
    return FrozenVAE()


@pytest.fixture(scope="module")
def cache(synth, vae, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache"))
    ds = build_dataset(synth["root"], "train")
    res = write_cache(ds, vae, out, **ARGS)
    write_manifest(out)
    return {"path": out, "dataset": ds, "res": res}


def test_manifest_counts_checksums_and_corrupt_report(cache, synth):
    with open(os.path.join(cache["path"], "manifest.json")) as f:
        m = json.load(f)
    assert m["num_images"] == 46 and m["num_corrupt"] == 2 and m["views"] == 2 and m["flips"]
    assert sorted(p for p, _ in m["corrupt"]) == sorted(synth["corrupt"])
    assert m["latent_shape"] == [4, 4, 4] and m["resolution"] == 32 and m["dtype"] == "fp16"
    assert m["vae"]["version"] == "d8" and m["vae"]["fingerprint"] == FrozenVAE().fingerprint
    assert m["augment"]["name"] == "pretrain" and len(m["shards"]) == 5
    from usp_scale.data.cache_format import sha256_file
    for sh in m["shards"]:
        assert sha256_file(os.path.join(cache["path"], sh["file"])) == sh["sha256"]


def test_cached_moments_equal_direct_encoding(cache, vae):
    c = LatentCache(cache["path"], verify="sha256")
    ds = cache["dataset"]
    tr = build_transform("pretrain", 32, 0.2, flip=False)
    for pos in (0, 13, 45):
        for view in (0, 1):
            for flip in (0, 1):
                mean, logvar, label, index = c.gather(np.array([pos]), np.array([view]), np.array([flip]))
                i = int(index[0])
                img, lab, _ = ds.load(i)
                with seeded(sample_seed(ARGS["seed"], 0, i, view)):
                    x = tr(img)[None]
                if flip:
                    x = x.flip(-1)
                m_ref, lv_ref = vae.encode_moments(x)
                assert int(label[0]) == lab
                # equal up to one fp16 step (the cache encoded in batches of 16, here a batch of 1)
                torch.testing.assert_close(mean.float(), m_ref.float(), atol=1e-4, rtol=1e-3)
                torch.testing.assert_close(logvar.float(), lv_ref.float(), atol=1e-4, rtol=1e-3)
    # views are different crops, flips are different images
    a = c.gather(np.array([5, 5]), np.array([0, 1]), np.array([0, 0]))[0]
    b = c.gather(np.array([5]), np.array([0]), np.array([1]))[0]
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], b[0])


def test_reader_picks_views_per_epoch_and_scales(cache):
    cfg = data_cfg("", format="latents", latent_cache=cache["path"], latent_sample=False, batch_size=8)
    ld = build_loader(cfg, VAEConfig(path="tiny-random"), seed=2)
    c = LatentCache(cache["path"])
    seen = set()
    for e in range(3):
        ld.set_epoch(e)
        for b in ld:
            seen.update(zip(b["view"].tolist(), b["flip"].tolist()))
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # check values of the first batch against a direct gather
    ld.set_epoch(0)
    b = next(iter(ld))
    positions = ld.sampler.batches(0)[0]
    mean, _, labels, index = c.gather(np.array(positions), b["view"].numpy(), b["flip"].numpy())
    torch.testing.assert_close(b["latents"], mean.float() * 0.18215)
    assert torch.equal(b["labels"], labels) and torch.equal(b["index"], index)
    assert b["latents"].dtype == torch.float32 and b["labels"].dtype == torch.long


def test_reader_sampling_and_exact_resume(cache):
    cfg = data_cfg("", format="latents", latent_cache=cache["path"], latent_sample=True, batch_size=4)
    ref = build_loader(cfg, VAEConfig(path="tiny-random"), rank=1, world_size=2, seed=3)
    ref.set_epoch(4)
    batches = list(ref)
    assert len(ref) == len(batches) == 23 // 4
    run = build_loader(cfg, VAEConfig(path="tiny-random"), rank=1, world_size=2, seed=3)
    run.set_epoch(4)
    it = iter(run)
    for _ in range(3):
        next(it)
    sd = run.state_dict()
    fresh = build_loader(cfg, VAEConfig(path="tiny-random"), rank=1, world_size=2, seed=3)
    fresh.load_state_dict(sd)
    fresh.set_epoch(4)
    nxt = next(iter(fresh))
    assert torch.equal(nxt["latents"], batches[3]["latents"]) and torch.equal(nxt["labels"], batches[3]["labels"])
    # the posterior is sampled: not the mean
    mean_cfg = data_cfg("", format="latents", latent_cache=cache["path"], latent_sample=False, batch_size=4)
    m = build_loader(mean_cfg, VAEConfig(path="tiny-random"), rank=1, world_size=2, seed=3)
    m.set_epoch(4)
    assert not torch.equal(next(iter(m))["latents"], batches[0]["latents"])


def test_two_ranks_read_disjoint_halves(cache):
    cfg = data_cfg("", format="latents", latent_cache=cache["path"], batch_size=5)
    got = [[i for b in build_loader(cfg, VAEConfig(path="tiny-random"), rank=r, world_size=2) for i in b["index"].tolist()]
           for r in range(2)]
    assert len(got[0]) == len(got[1]) == 20 and not set(got[0]) & set(got[1])


def test_cache_mismatch_and_checksum_errors(cache, tmp_path):
    cfg = data_cfg("", format="latents", latent_cache=cache["path"], image_size=64)
    with pytest.raises(LatentCacheError, match=r"resolution: cache 32 vs requested data.image_size=64"):
        build_loader(cfg, VAEConfig(path="tiny-random"))
    cfg = data_cfg("", format="latents", latent_cache=cache["path"])
    with pytest.raises(LatentCacheError, match=r"VAE version: cache d8 vs requested vae.version=d16"):
        build_loader(cfg, VAEConfig(path="tiny-random", version="d16"))
    with pytest.raises(LatentCacheError, match=r"VAE: the cache was encoded by a VAE with content fingerprint"):
        build_loader(cfg, VAEConfig(path="sd-random"))  # another VAE (tests/test_cache_integrity.py: by content)
    # issue 18 item 6: a cache of RandomResizedCrop views used by a job that trains on ADM crops
    with pytest.raises(LatentCacheError, match=r"augmentation: the cache holds 2 view\(s\) per image made with "
                                               r"--augment pretrain, crop scale 0.2-1, the job has data.augment=adm"):
        build_loader(data_cfg("", format="latents", latent_cache=cache["path"], augment="adm"),
                     VAEConfig(path="tiny-random"))
    with pytest.raises(LatentCacheError, match=r"data.crop_scale_min=0.5"):
        build_loader(data_cfg("", format="latents", latent_cache=cache["path"], crop_scale_min=0.5),
                     VAEConfig(path="tiny-random"))
    with pytest.raises(LatentCacheError, match="no manifest.json"):
        LatentCache(str(tmp_path))
    # a damaged copy: one flipped byte is reported by shard name
    import shutil
    bad = str(tmp_path / "bad")
    shutil.copytree(cache["path"], bad)
    p = os.path.join(bad, "shard_000002.safetensors")
    data = bytearray(open(p, "rb").read())
    data[-5] ^= 0xFF
    open(p, "wb").write(bytes(data))
    c = LatentCache(bad, verify="size")  # same size: "size" does not see it when opening ...
    lo, hi = c.offsets[2], c.offsets[3]
    with pytest.raises(LatentCacheError, match=r"shard_000002.safetensors: record \d+ .* fails its CRC-32"):
        LatentCache(bad).gather(np.arange(lo, hi).repeat(4), np.tile([0, 0, 1, 1], hi - lo),
                                np.tile([0, 1, 0, 1], hi - lo))  # ... the default "records" sees it when read
    with pytest.raises(LatentCacheError, match=r"shard_000002.safetensors \(sha256 mismatch\)"):
        LatentCache(bad, verify="sha256")


def test_crash_and_resume_skips_finished_shards(synth, vae, cache, tmp_path):
    ds = build_dataset(synth["root"], "train")
    out = str(tmp_path / "c")
    r1 = write_cache(ds, vae, out, stop_after_shards=2, **ARGS)
    assert r1["written"] == [0, 1]
    with pytest.raises(LatentCacheError, match=r"shards \[2, 3, 4\] .* are not written yet"):
        write_manifest(out)
    # a crash in the middle of a shard leaves only a temporary file, never a shard that looks complete
    open(os.path.join(out, ".shard_000002.safetensors.tmp999"), "wb").write(b"half")
    # a damaged finished shard is rewritten (checksum mismatch)
    p = os.path.join(out, "shard_000001.safetensors")
    data = bytearray(open(p, "rb").read())
    data[-3] ^= 0xFF
    open(p, "wb").write(bytes(data))
    r2 = write_cache(ds, vae, out, **ARGS)
    assert r2["skipped"] == [0] and r2["written"] == [1, 2, 3, 4]
    m = write_manifest(out)
    with open(os.path.join(cache["path"], "manifest.json")) as f:
        full = json.load(f)
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in full["shards"]]  # identical to one run
    r3 = write_cache(ds, vae, out, **ARGS)
    assert r3["written"] == [] and r3["skipped"] == [0, 1, 2, 3, 4]
    with pytest.raises(LatentCacheError, match=r"different settings \(views differ"):
        write_cache(ds, vae, out, **{**ARGS, "views": 3})


def test_torchrun_two_ranks_gloo(synth_clean, tmp_path):
    out = str(tmp_path / "dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(REPO, "launchers", "cache_latents.py"),
           "--data-root", synth_clean["root"], "--out", out, "--views", "2", "--image-size", "32",
           "--shard-size", "5", "--batch-size", "8", "--num-workers", "0", "--no-progress", "--device", "cpu",
           "--vae-path", "tiny-random"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert "CACHE_DONE rank=0" in p.stdout and "CACHE_DONE rank=1" in p.stdout, p.stdout + p.stderr
    assert "rank 0: wrote shards [0, 2, 4]" in p.stdout and "rank 1: wrote shards [1, 3]" in p.stdout
    # the reader over two gloo ranks: no sample duplicated or lost, epochs reshuffled
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(REPO, "tests", "_dist_reader_check.py"), out, "24"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert "READER_OK" in r.stdout, r.stdout + r.stderr
    c = LatentCache(out, verify="sha256")
    assert len(c) == 24 and sorted(c.gather(np.arange(24), np.zeros(24, int), np.zeros(24, int))[3].tolist()) \
        == list(range(24))
    # the same shards as one process would write (up to float reduction order across thread counts)
    ds = build_dataset(synth_clean["root"], "train")
    one = str(tmp_path / "one")
    write_cache(ds, FrozenVAE(), one, image_size=32, views=2, shard_size=5, batch_size=8, progress=False)
    write_manifest(one)
    ref = LatentCache(one)
    sel = np.arange(24)
    for v in (0, 1):
        for f in (0, 1):
            a = c.gather(sel, np.full(24, v), np.full(24, f))
            b = ref.gather(sel, np.full(24, v), np.full(24, f))
            torch.testing.assert_close(a[0].float(), b[0].float(), atol=2e-3, rtol=2e-3)
            assert torch.equal(a[2], b[2])


def test_build_loader_online_path(synth_clean):
    cfg = data_cfg(synth_clean["root"], batch_size=6, augment="adm")
    ld = build_loader(cfg, VAEConfig(path="tiny-random", posterior="sample"), rank=0, world_size=2, seed=1)
    assert len(ld) == 2
    batches = list(ld)
    b = batches[0]
    assert b["latents"].shape == (6, 4, 4, 4) and b["latents"].dtype == torch.float32
    assert b["labels"].shape == (6,) and b["labels"].dtype == torch.long
    again = build_loader(cfg, VAEConfig(path="tiny-random", posterior="sample"), rank=0, world_size=2, seed=1)
    again.load_state_dict({"epoch": 0, "position": 1})
    assert torch.equal(next(iter(again))["latents"], batches[1]["latents"])  # identical resumed batch
    ev = build_loader(data_cfg(synth_clean["root"], batch_size=3), VAEConfig(path="tiny-random"), train=False)
    assert sum(len(x["labels"]) for x in ev) == 8


@pytest.mark.skipif(not __import__("usp_scale.data.dali", fromlist=["x"]).dali_available(), reason="no DALI")
def test_dali_cache_writer_is_deterministic_and_skips_truncated(synth, vae, tmp_path):
    ds = build_dataset(synth["root"], "train")
    args = {**ARGS, "loader": "dali", "shard_size": 16}
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_cache(ds, vae, a, **args)
    ma = write_manifest(a)
    write_cache(ds, vae, b, stop_after_shards=1, **args)
    write_cache(ds, vae, b, **args)
    mb = write_manifest(b)
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    assert ma["num_images"] == 46 and sorted(p for p, _ in ma["corrupt"]) == sorted(synth["corrupt"])
    c = LatentCache(a)
    mean, _, labels, index = c.gather(np.arange(46), np.zeros(46, int), np.zeros(46, int))
    assert sorted(index.tolist()) == sorted(set(range(48)) - {i for i, r in enumerate(ds.samples)
                                                               if r.path in synth["corrupt"]})
    assert labels.tolist() == [ds.samples[i].label for i in index.tolist()]
    v1 = c.gather(np.arange(46), np.ones(46, int), np.zeros(46, int))[0]
    fl = c.gather(np.arange(46), np.zeros(46, int), np.ones(46, int))[0]
    assert not torch.equal(mean, v1) and not torch.equal(mean, fl)
    with pytest.raises(LatentCacheError, match="different settings"):
        write_cache(ds, vae, a, **{**args, "loader": "torchvision"})
