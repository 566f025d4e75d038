"""The teacher-feature cache (usp_scale/data/teacher_cache.py): written beside a latent cache from the same crops,
read record for record with it (values equal the teacher run on the reproduced crops, plain and flipped),
resumable and sharded over ranks, verified (record CRCs, header hashes), refused for another teacher or another
crop set, naming the file."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from _helpers_data import synth  # noqa: F401
from usp_scale.checkpoint.safe_load import write_checked_json
from usp_scale.data import LatentCache, build_dataset, write_cache, write_manifest
from usp_scale.data.teacher_cache import (TeacherCacheError, TeacherFeatureCache, crop_set, write_teacher_cache,
                                          write_teacher_manifest)
from usp_scale.data.transforms import build_transform, sample_seed, seeded
from usp_scale.models.teacher import DINOv2ViT, FrozenTeacher, TeacherSpec
from usp_scale.vae import FrozenVAE

LATENT = dict(image_size=32, augment="pretrain", views=2, seed=11, dtype="fp16", shard_size=10, batch_size=8,
              progress=False)
SPEC = TeacherSpec(embed_dim=32, depth=1, num_heads=2, patch_size=8)


def make_teacher(seed=0):
    torch.manual_seed(seed)
    net = DINOv2ViT(SPEC, grid=4)                       # 32 px in, 4 x 4 = 16 tokens of width 32
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return FrozenTeacher(net, name="tiny-test", image_size=32)


@pytest.fixture(scope="module")
def caches(synth, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("tcache")
    ds = build_dataset(synth["root"], "train")
    lat = str(root / "latents")
    write_cache(ds, FrozenVAE(), lat, **LATENT)
    write_manifest(lat)
    out = str(root / "teacher")
    teacher = make_teacher()
    res = write_teacher_cache(ds, teacher, out, lat, batch_size=7, progress=False)
    write_teacher_manifest(out)
    return {"root": root, "dataset": ds, "latent": lat, "out": out, "teacher": teacher, "res": res}


def test_records_are_the_teacher_on_the_latent_caches_crops(caches):
    lat, tc = LatentCache(caches["latent"]), TeacherFeatureCache(caches["out"], verify="sha256")
    tc.check(latent_cache=lat, teacher_content=caches["teacher"].content_fingerprint(), tokens=16)
    assert len(tc) == len(lat) == 46 and tc.views == 2 and tc.flips == 2 and (tc.tokens, tc.dim) == (16, 32)
    ds, teacher = caches["dataset"], caches["teacher"]
    tr = build_transform("pretrain", 32, 0.2, flip=False)
    for pos in (0, 9, 10, 45):
        for view in (0, 1):
            for flip in (0, 1):
                feats = tc.gather(np.array([pos]), np.array([view]), np.array([flip]))
                _, _, _, index = lat.gather(np.array([pos]), np.array([view]), np.array([flip]))
                i = int(index[0])
                img, _, _ = ds.load(i)
                with seeded(sample_seed(LATENT["seed"], 0, i, view)):
                    x = tr(img)[None]                    # the crop the latent cache encoded
                want = teacher.from_unit_range(x.flip(-1) if flip else x).to(torch.bfloat16)
                assert feats.dtype == torch.bfloat16 and torch.equal(feats, want), (pos, view, flip)
    # a batch mixing shards, views and flips
    idx, v, f = np.array([44, 3, 17, 3]), np.array([1, 0, 1, 1]), np.array([0, 1, 1, 0])
    batch = tc.gather(idx, v, f)
    for j in range(4):
        assert torch.equal(batch[j], tc.gather(idx[j:j + 1], v[j:j + 1], f[j:j + 1])[0])
    m = tc.manifest
    assert m["teacher"]["content"] == teacher.content_fingerprint() and m["num_images"] == 46
    assert m["crop_set"]["seed"] == 11 and m["crop_set"]["views"] == 2 and m["flips"]


def _digests(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")}


def test_resume_and_ranks_write_the_same_shards(caches, tmp_path):
    ds, lat, teacher = caches["dataset"], caches["latent"], caches["teacher"]
    out = str(tmp_path / "resumed")
    first = write_teacher_cache(ds, teacher, out, lat, batch_size=4, progress=False, stop_after_shards=2)
    assert first["written"] == [0, 1]
    with pytest.raises(TeacherCacheError, match=r"shards \[2, 3, 4\]"):
        write_teacher_manifest(out)
    second = write_teacher_cache(ds, teacher, out, lat, batch_size=4, progress=False)
    assert second["skipped"] == [0, 1] and second["written"] == [2, 3, 4]
    ranks = str(tmp_path / "ranks")
    for r in (1, 0):
        got = write_teacher_cache(ds, teacher, ranks, lat, batch_size=5, progress=False, rank=r, world_size=2)
        assert got["written"] == [s for s in range(5) if s % 2 == r]
    write_teacher_manifest(out)
    write_teacher_manifest(ranks)
    assert _digests(out) == _digests(ranks) == _digests(caches["out"])   # batch size and rank change nothing
    TeacherFeatureCache(ranks).check(latent_cache=lat)


def test_damage_is_found_and_named(caches, tmp_path):
    out = str(tmp_path / "damaged")
    shutil.copytree(caches["out"], out)
    tc = TeacherFeatureCache(out)
    shard = os.path.join(out, "shard_000001.safetensors")
    data = bytearray(open(shard, "rb").read())
    hlen = int.from_bytes(data[:8], "little")
    start = json.loads(bytes(data[8:8 + hlen]))["features"]["data_offsets"][0]
    rec = 1 * 2 * 2 + 1 * 2 + 1                       # record 1, view 1, flip 1 of the (n, K, F, T, D) array
    off = 8 + hlen + start + rec * 16 * 32 * 2 + 100
    data[off] ^= 0x01
    open(shard, "wb").write(bytes(data))
    tc = TeacherFeatureCache(out)                     # same size and header: opens
    assert tc.gather(np.array([10]), np.array([1]), np.array([1])).shape == (1, 16, 32)   # record 0 of shard 1
    with pytest.raises(TeacherCacheError, match=r"shard_000001.safetensors: record 1 .*view 1, flip 1\) fails its "
                                                r"CRC-32"):
        tc.gather(np.array([10, 11]), np.array([0, 1]), np.array([0, 1]))
    # a changed header (another tensor name) is refused when opened
    data = bytearray(open(shard, "rb").read())
    data[data.index(b"features")] = ord("F")
    open(shard, "wb").write(bytes(data))
    with pytest.raises(TeacherCacheError, match="shard_000001.safetensors \\(header changed\\)"):
        TeacherFeatureCache(out)
    with pytest.raises(TeacherCacheError, match="no manifest.json"):
        TeacherFeatureCache(str(tmp_path))


def _relabelled(latent, out, change):
    """A copy of a latent cache whose (self-hashed) manifest says ``change``: the seed, or two shards' index arrays
    swapped (what the reader's crop-set check reads; the shard files are the original ones)."""
    shutil.copytree(latent, out)
    mpath = os.path.join(out, "manifest.json")
    m = json.load(open(mpath))
    m.pop("manifest_sha256")
    if change.get("shards") == "swap":
        a, b = m["shards"][0]["arrays_crc32"], m["shards"][1]["arrays_crc32"]
        a["index"], b["index"] = b["index"], a["index"]
    else:
        m.update(change)
    write_checked_json(mpath, m, key="manifest_sha256")
    return out


def test_another_teacher_or_crop_set_is_refused(caches, tmp_path):
    ds, lat, out = caches["dataset"], caches["latent"], caches["out"]
    tc = TeacherFeatureCache(out)
    other = make_teacher(seed=3)
    with pytest.raises(TeacherCacheError, match=f"fingerprint {other.content_fingerprint()}"):
        tc.check(teacher_content=other.content_fingerprint())
    with pytest.raises(TeacherCacheError, match="tokens per image, the model has 64"):
        tc.check(tokens=64)
    # a latent cache of the same images cropped with another seed, or holding other images: another crop set
    for change, what in (({"seed": 12}, "seed"), ({"shards": "swap"}, "shards differ: the shards hold other images")):
        lat2 = _relabelled(lat, str(tmp_path / what.split(" ")[0]), change)
        with pytest.raises(TeacherCacheError, match=f"another crop set .*{what}"):
            tc.check(latent_cache=lat2)
    # the writer refuses to continue a folder written for another teacher
    with pytest.raises(TeacherCacheError, match="different settings .*teacher"):
        write_teacher_cache(ds, other, out, lat, progress=False)


def test_writer_refusals(caches, tmp_path):
    ds, lat = caches["dataset"], caches["latent"]
    big = FrozenTeacher(DINOv2ViT(SPEC, grid=8), name="t", image_size=64)
    with pytest.raises(TeacherCacheError, match="64 px images, latent cache .* holds 32 px"):
        write_teacher_cache(ds, big, str(tmp_path / "a"), lat, progress=False)
    dali = _relabelled(lat, str(tmp_path / "dali"), {"loader": "dali"})
    with pytest.raises(TeacherCacheError, match="--loader dali"):
        write_teacher_cache(ds, caches["teacher"], str(tmp_path / "b"), dali, progress=False)
    small = torch.utils.data.Subset(ds, range(10))
    small.samples, small.root = ds.samples[:10], ds.root
    with pytest.raises(TeacherCacheError, match="has 10 images, latent cache .* from 48"):
        write_teacher_cache(small, caches["teacher"], str(tmp_path / "c"), lat, progress=False)


def test_benchmark_script_runs_and_prices_both_modes(tmp_path, capsys):
    """benchmarks/data/bench_teacher_cache.py at a toy size: the record size, the ImageNet total and the online
    teacher's share of a SiT-XL/2 step (46.3 / 711.7 GFLOP) come out as docs/method.md §9.4 states them."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "data",
                        "bench_teacher_cache.py")
    spec = importlib.util.spec_from_file_location("bench_teacher_cache", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = str(tmp_path / "report.md")
    mod.main(["--images", "6", "--shard-size", "4", "--repeats", "1", "--batch", "3", "--teacher-batch", "0",
              "--dir", str(tmp_path), "--out", out])
    text = open(out).read()
    for want in ("| record: 256 tokens x 768 bf16 | 393,216 bytes |", "ImageNet-1k train (1,281,167 images), plain + "
                 "flipped | 1.01 TB", "46.3 GFLOP/image", "237.2 / 711.7 GFLOP/image", "| online teacher / SiT-XL/2 "
                 "step | 6.5 % (teacher + projector: 8.3 %) |", "verify=size"):
        assert want in text, want


def test_writer_refuses_images_that_are_not_the_ones_the_latent_cache_encoded(synth, tmp_path):  # noqa: F811
    """Same count, same labels, other pixels: the latent manifest keeps each shard's source fingerprint (path, size,
    mtime of every file), the teacher crop set records it, and the writer refuses a shard whose files changed or
    moved, naming them -- a replaced image would otherwise get another image's teacher tokens."""
    root = str(tmp_path / "data")
    shutil.copytree(synth["root"], root)
    ds = build_dataset(root, "train")
    lat = str(tmp_path / "latents")
    write_cache(ds, FrozenVAE(), lat, **{**LATENT, "shard_size": 24})
    m = write_manifest(lat)
    assert all(len(sh["sources"]["sha256"]) == 64 for sh in m["shards"])
    teacher = make_teacher()
    res = write_teacher_cache(ds, teacher, str(tmp_path / "ok"), lat, progress=False, stop_after_shards=1)
    assert res["written"] == [0]
    assert len(crop_set(m)["shards"][0]) == 3      # count, index CRC, sources
    # shard 1's image replaced by another image's bytes (same size class, same label folder, newer mtime)
    victim = ds.samples[30].path
    shutil.copyfile(ds.samples[31].path, victim)
    os.utime(victim, ns=(os.stat(victim).st_atime_ns, os.stat(victim).st_mtime_ns + 10**9))
    with pytest.raises(TeacherCacheError, match=f"shard 1 .*not the files it encoded: {victim}"):
        write_teacher_cache(ds, teacher, str(tmp_path / "ok"), lat, progress=False)
    # the same files at another path (mtimes kept): refused as moved, with the fix
    moved = str(tmp_path / "moved")
    shutil.copytree(synth["root"], moved)
    with pytest.raises(TeacherCacheError, match="shard 0 .*renamed, moved .*latent cache was written from"):
        write_teacher_cache(build_dataset(moved, "train"), teacher, str(tmp_path / "m"), lat, progress=False)
