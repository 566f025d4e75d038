"""Latent cache integrity by default: same-size damage is caught when read (before the model), non-finite moments are
refused at write and at read with shard and record, the VAE is identified by its content (folder names never decide),
and the manifest and shard headers carry hashes."""
import json
import os
import shutil

import numpy as np
import pytest

from _helpers_data import data_cfg, synth, synth_clean  # noqa: F401
from usp_scale.config import VAEConfig
from usp_scale.data import LatentCache, LatentCacheError, build_dataset, build_loader, write_cache, write_manifest
from usp_scale.vae import FrozenVAE

ARGS = dict(image_size=32, augment="pretrain", views=2, seed=1, dtype="fp16", shard_size=8, batch_size=8,
            progress=False)


def _every_record(c: LatentCache):
    n = len(c)
    idx = np.repeat(np.arange(n), 2 * c.views)
    slot = np.tile(np.arange(2 * c.views), n)
    return idx, slot // 2, slot % 2


def read_all(path: str, verify: str = "records"):
    """Open the cache and gather every (record, view, flip): what training would eventually read."""
    c = LatentCache(path, verify=verify)
    return c.gather(*_every_record(c))


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    """Two diffusers folders with different weights (A/vae, B/vae), A's weights under another folder name, and
    A's weights as a single .safetensors file."""
    from usp_scale.vae.frozen import load_autoencoder

    root = tmp_path_factory.mktemp("vaes")
    load_autoencoder("tiny-random", seed=0).save_pretrained(str(root / "A" / "vae"))
    load_autoencoder("tiny-random", seed=1).save_pretrained(str(root / "B" / "vae"))
    shutil.copytree(root / "A" / "vae", root / "copy" / "sd-vae-ft-ema")
    shutil.copy(root / "A" / "vae" / "diffusion_pytorch_model.safetensors", root / "a_weights.safetensors")
    return root


@pytest.fixture(scope="module")
def cache_a(synth_clean, vae_dirs, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("cache_a"))
    write_cache(build_dataset(synth_clean["root"], "train"), FrozenVAE(path=str(vae_dirs / "A" / "vae")), out, **ARGS)
    write_manifest(out)
    return out


def test_vae_identity_is_content_not_folder_name(cache_a, vae_dirs):
    cfg = data_cfg("", format="latents", latent_cache=cache_a)
    with pytest.raises(LatentCacheError, match=r"holds different weights or architecture"):
        build_loader(cfg, VAEConfig(path=str(vae_dirs / "B" / "vae")))  # other weights, same folder name "vae"
    for same in (vae_dirs / "copy" / "sd-vae-ft-ema", vae_dirs / "a_weights.safetensors"):
        ld = build_loader(cfg, VAEConfig(path=str(same)))  # the same weights under another name / format
        assert len(next(iter(ld))["latents"]) == 4
    m = json.load(open(os.path.join(cache_a, "manifest.json")))
    assert m["vae"]["content"] == FrozenVAE(path=str(vae_dirs / "copy" / "sd-vae-ft-ema")).content_fingerprint
    # the fingerprint is of the weights as loaded, not of the compute precision
    assert FrozenVAE(path=str(vae_dirs / "A" / "vae"), dtype="bf16").content_fingerprint == m["vae"]["content"]


def test_same_size_overwrite_is_caught_when_read(cache_a, tmp_path):
    """The issue's case: 2,900 bytes overwritten in a shard, size unchanged, default settings."""
    bad = str(tmp_path / "bad")
    shutil.copytree(cache_a, bad)
    p = os.path.join(bad, "shard_000001.safetensors")
    data = bytearray(open(p, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 2900] = os.urandom(2900)
    open(p, "wb").write(bytes(data))
    c = LatentCache(bad)  # opening reads no record data: cheap, and the damage is in record data
    with pytest.raises(LatentCacheError, match=r"shard_000001\.safetensors: record \d+ \(source image \d+, view \d, "
                                               r"flip \d\) fails its CRC-32.*Nothing of the batch reached the model"):
        c.gather(*_every_record(c))


def test_training_stops_on_a_damaged_record_before_the_model(cache_a, tmp_path):
    from usp_scale.config import load_config
    from usp_scale.training import Trainer

    bad = str(tmp_path / "bad")
    shutil.copytree(cache_a, bad)
    p = os.path.join(bad, "shard_000000.safetensors")
    data = bytearray(open(p, "rb").read())
    for i in range(len(data) // 3, len(data) - 64, 97):  # scattered bit flips across the record data
        data[i] ^= 0x04
    open(p, "wb").write(bytes(data))
    cfg = load_config(None, ["model.name=vit_tiny_patch_vae", "model.img_size=4", "data.format=latents",
                             "vae.path=tiny-random", f"data.latent_cache={bad}", "data.image_size=32", f"output_dir={tmp_path}/run",
                             "data.batch_size=4", "schedule.max_steps=20", "schedule.warmup_steps=1",
                             "progress=false", "checkpoint.every_steps=0", "data.num_classes=4", "model.num_classes=4"])
    seen = []
    t = Trainer(cfg)
    orig = t.task.loss
    t.task.loss = lambda engine, batch, **kw: (seen.append(batch["index"].clone()) if "index" in batch else None,
                                               orig(engine, batch, **kw))[1]
    with pytest.raises(LatentCacheError, match=r"shard_000000\.safetensors: record \d+"):
        t.fit()
    damaged = set(range(0, 8))  # shard 0 holds source images 0..7
    assert all(not (set(b.tolist()) & damaged) for b in seen)  # no training batch held a damaged record


def _record_offset(path: str, name: str, record: int) -> int:
    import struct
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    b, _ = header[name]["data_offsets"]
    shape = header[name]["shape"]
    per_record = int(np.prod(shape[1:])) * 2
    return 8 + hlen + b + record * per_record


def test_nonfinite_moments_are_refused_with_shard_and_record(cache_a, tmp_path):
    bad = str(tmp_path / "inf")
    shutil.copytree(cache_a, bad)
    p = os.path.join(bad, "shard_000002.safetensors")
    off = _record_offset(p, "mean", 3)
    with open(p, "r+b") as f:  # +inf (fp16 0x7C00) in record 3, view 0, flip 0
        f.seek(off)
        f.write(np.array([np.inf], np.float16).tobytes())
    with pytest.raises(LatentCacheError,
                       match=r"shard_000002\.safetensors: record 3 .*view 0, flip 0\) holds non-finite"):
        read_all(bad, verify="size")  # no CRC: the finiteness check still runs
    with pytest.raises(LatentCacheError, match=r"shard_000002\.safetensors: record 3 .*fails its CRC-32"):
        read_all(bad)


def test_writer_drops_nonfinite_moments_and_reports_them(synth_clean, tmp_path):  # noqa: F811
    vae = FrozenVAE()
    orig = vae.encode_moments

    def overflow(x):
        m, lv = orig(x)
        m[0] = 1e6  # beyond fp16: inf in the cache dtype
        return m, lv
    vae.encode_moments = overflow
    ds = build_dataset(synth_clean["root"], "train")
    write_cache(ds, vae, str(tmp_path / "c"), **{**ARGS, "views": 1, "batch_size": 64, "shard_size": 64})
    m = write_manifest(str(tmp_path / "c"))
    assert m["num_corrupt"] >= 1 and all("not finite" in msg for _, msg in m["corrupt"])
    assert m["num_images"] == len(ds) - m["num_corrupt"]
    read_all(str(tmp_path / "c"))  # what was written is clean


def test_manifest_and_headers_are_hashed(cache_a, tmp_path):
    bad = str(tmp_path / "m")
    shutil.copytree(cache_a, bad)
    mp = os.path.join(bad, "manifest.json")
    m = json.load(open(mp))
    m["num_images"] += 1
    json.dump(m, open(mp, "w"), indent=1)
    with pytest.raises(LatentCacheError, match=r"manifest\.json has changed since it was written"):
        LatentCache(bad)
    moved = str(tmp_path / "moved")
    shutil.copytree(cache_a, moved)
    a, b = (os.path.join(moved, f"shard_00000{i}.safetensors") for i in (1, 2))
    os.replace(a, a + ".x")
    shutil.copy(b, a)  # shard 2's bytes under shard 1's name (same size)
    with pytest.raises(LatentCacheError, match=r"shard_000001\.safetensors \(header changed\)"):
        LatentCache(moved)


def test_strict_cache_writer_names_its_own_flag(synth, tmp_path):  # noqa: F811
    from usp_scale.data.datasets import CorruptImageError

    with pytest.raises(CorruptImageError) as e:
        write_cache(build_dataset(synth["root"], "train"), FrozenVAE(), str(tmp_path / "c"), **ARGS, strict=True)
    assert "--strict" in str(e.value) and "data.strict" not in str(e.value)


def test_old_format_is_refused_with_a_way_out(cache_a, tmp_path):
    old = str(tmp_path / "old")
    shutil.copytree(cache_a, old)
    mp = os.path.join(old, "manifest.json")
    m = json.load(open(mp))
    m["version"] = 1
    json.dump(m, open(mp, "w"))
    with pytest.raises(LatentCacheError, match=r"format version 1.*rebuild the cache"):
        LatentCache(old)
