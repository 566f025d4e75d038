"""The shipped small components (usp_scale/assets/): the trained VAE `synthetic-f8`, extractor `usp-synthetic` and
REPA teacher `synthetic-vit`.

They are checked against images they never saw (a fresh val split), so a wrong, random or stale weight file fails.
"""
import json
import os
import runpy
import shutil
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def val_images(tmp_path_factory):
    """The synthetic val split of the assets' dataset (seed 0), 3 images per class: never trained on."""
    from usp_scale.data.synthetic import load_split, make_synthetic

    root = str(tmp_path_factory.mktemp("syn"))
    make_synthetic(root, classes=10, per_class=1, size=64, val_per_class=3, seed=0)
    return load_split(root, "val"), root


def test_synthetic_classes_differ_in_shape_texture_and_colour():
    from usp_scale.data.synthetic import class_style

    styles = [class_style(c) for c in range(18)]
    assert len({(s["shape"], s["texture"]) for s in styles}) == 18
    assert {s["texture"] for s in styles[:3]} == {"plain", "stripes", "checker"}
    assert len({s["rgb"] for s in styles[:10]}) == 10


def test_shipped_vae_reconstructs_unseen_images_with_its_own_scale(val_images):
    from usp_scale import assets
    from usp_scale.vae import FrozenVAE
    from usp_scale.vae.named import shipped, shipped_scale

    (x, _), _ = val_images
    assert "synthetic-f8" in shipped()
    meta = assets.read_meta("vae", "synthetic-f8")
    vae = FrozenVAE(path="synthetic-f8")
    assert vae.scale == shipped_scale("synthetic-f8") == meta["scaling_factor"] != 0.18215
    assert vae.downsample == 8 and vae.latent_channels == 4 and vae.model.config.scaling_factor == vae.scale
    xi = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = vae.encode(xi)
    assert z.shape == (30, 4, 8, 8)
    assert 0.7 < float(z.std()) < 1.4          # 1 / std of the train latents: unit scale on unseen images too
    rec = ((vae.decode(z) + 1) * 127.5).round()
    mse = (rec - torch.from_numpy(x).permute(0, 3, 1, 2).float()).pow(2).flatten(1).mean(1)
    psnr = (10 * torch.log10(255.0 ** 2 / mse)).mean().item()
    assert psnr > 24.0, psnr                   # recorded on 400 val images: see asset.json; a random VAE gives ~10
    assert abs(psnr - meta["val_psnr_db"]) < 2.5


def test_shipped_vae_scale_reaches_the_latent_cache_loader(tmp_path, val_images):
    from usp_scale.config import DataConfig, VAEConfig
    from usp_scale.data import build_dataset, build_loader, write_cache, write_manifest
    from usp_scale.vae import FrozenVAE
    from usp_scale.vae.named import shipped_scale

    _, root = val_images
    vae = FrozenVAE(path="synthetic-f8")
    cache = str(tmp_path / "cache")
    write_cache(build_dataset(root, "val", "folder"), vae, cache, image_size=64, augment="adm", views=1,
                shard_size=100, batch_size=30, num_workers=0, progress=False)
    write_manifest(cache)
    loader = build_loader(DataConfig(root=root, format="latents", latent_cache=cache, image_size=64, batch_size=30,
                                     latent_sample=False, augment="adm"), VAEConfig(path="synthetic-f8"), seed=0)
    assert loader.scale.scale == shipped_scale("synthetic-f8") and not loader.scale.channelwise
    batch = next(iter(loader))
    assert 0.7 < float(batch["latents"].std()) < 1.4


def test_changed_weights_are_refused(tmp_path, monkeypatch):
    from usp_scale import assets

    shutil.copytree(os.path.join(assets.ROOT, "vae"), tmp_path / "vae")
    monkeypatch.setattr(assets, "ROOT", str(tmp_path))
    assert assets.verified_dir("vae", "synthetic-f8") == str(tmp_path / "vae" / "synthetic-f8")
    w = tmp_path / "vae" / "synthetic-f8" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(assets.AssetError, match="sha256 .* differs .* launchers/train_vae|Retrain"):
        assets.verified_dir("vae", "synthetic-f8")
    with pytest.raises(assets.AssetError, match="no shipped vae named 'nope'"):
        assets.asset_dir("vae", "nope")
    assert not assets.is_asset("vae", "some/dir/synthetic-f8")


def test_shipped_extractor_classifies_unseen_images_and_separates_noise(val_images):
    from usp_scale import assets
    from usp_scale.eval import compute_metrics, create_extractor

    (x, y), root = val_images
    meta = assets.read_meta("extractor", "synthetic-cnn")
    assert meta["val_top1"] >= 95.0
    ext = create_extractor("usp-synthetic", ["logits_unbiased", "pool"])
    logits, pool = ext(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    assert pool.shape == (30, 64)
    assert (logits.argmax(1).numpy() == y).mean() >= 0.9
    assert ext.cache_tag and len(ext.cache_tag) == 12
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (30, 64, 64, 3), dtype=np.uint8)
    real = compute_metrics(x[::-1].copy(), os.path.join(root, "val"), ["fid"], "usp-synthetic", progress=False)
    bad = compute_metrics(noise, os.path.join(root, "val"), ["fid", "is"], "usp-synthetic", progress=False)
    assert real["fid"] < 1e-6 and bad["fid"] > 100 and bad["is_mean"] < 1.5


def test_train_scripts_write_loadable_assets(tmp_path, monkeypatch):
    """launchers/train_vae.py and train_extractor.py end to end at toy sizes: the folders they write load through
    the same code as the shipped ones and record their hashes."""
    from usp_scale import assets

    data = str(tmp_path / "data")
    for script, kind, name, extra in (
            ("train_vae.py", "vae", "v", ["--steps", "3", "--full-steps", "1", "--batch-size", "4"]),
            ("train_extractor.py", "extractor", "e", ["--epochs", "1", "--batch-size", "8"]),
            ("train_teacher.py", "teacher", "synthetic-vit", ["--epochs", "1", "--batch-size", "8"])):
        monkeypatch.setattr(sys, "argv", [script, "--out", str(tmp_path / kind / name), "--data", data,
                                          "--per-class", "2", "--val-per-class", "1", "--no-progress", *extra])
        runpy.run_path(os.path.join(ROOT, "launchers", script), run_name="__main__")
        meta = json.load(open(tmp_path / kind / name / "asset.json"))
        assert meta["command"].startswith(f"python launchers/{script} --out") and meta["seed"] == 0
        assert (tmp_path / kind / name / "README.md").is_file()
    monkeypatch.setattr(assets, "ROOT", str(tmp_path))
    from usp_scale.eval.features import load_synthetic_cnn
    from usp_scale.vae import FrozenVAE

    vae = FrozenVAE(path="v")                      # a short name resolved under the (patched) asset root
    assert vae.scale == json.load(open(tmp_path / "vae" / "v" / "asset.json"))["scaling_factor"]
    assert load_synthetic_cnn(str(tmp_path / "extractor" / "e")).fc.out_features == 10
    from usp_scale.transfer.teachers import load_teacher
    t = load_teacher("synthetic-vit", name="synthetic-vit", image_size=64)   # the (patched) asset root's
    assert t.source == str(tmp_path / "teacher" / "synthetic-vit" / "model.safetensors") and t.num_tokens == 16


def test_shipped_teacher_tokens_carry_the_class(val_images):
    """synthetic-vit (repa.teacher_path=synthetic-vit): DINOv2's architecture, loaded strictly through REPA's
    teacher loader, REPA's input transform (64 px -> 56 px bicubic, 16 tokens); on unseen images every patch
    token names its class by the nearest class mean of the other images' tokens (no trained head)."""
    import torch.nn.functional as F

    from usp_scale import assets
    from usp_scale.models.teacher import repa_preprocess
    from usp_scale.transfer.teachers import TeacherWeightsError, load_teacher

    meta = assets.read_meta("teacher", "synthetic-vit")
    assert meta["teacher"] == "synthetic-vit" and meta["tokens"] == 16 and meta["val_token_top1"] >= 95.0
    w = os.path.join(assets.verified_dir("teacher", "synthetic-vit"), "model.safetensors")
    assert os.path.getsize(w) < 1_000_000
    t = load_teacher("synthetic-vit", name="synthetic-vit", image_size=64)
    assert (t.input_size, t.num_tokens, t.dim) == (56, 16, 64) and not t.net.training
    (x, y), _ = val_images
    raw = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()          # uint8 (30, 3, 64, 64)
    tok = t(raw)
    assert tok.shape == (30, 16, 64)
    assert torch.equal(tok, t.net(repa_preprocess(raw, 56)))          # REPA's transform, nothing else
    assert t.preprocessing()["resize"] == {"from": 64, "to": 56, "mode": "bicubic", "align_corners": False,
                                           "antialias": False}
    y = torch.from_numpy(y).long()
    z = F.normalize(tok, dim=-1)
    hits = 0
    for i in range(len(z)):                       # leave-one-out class means over the other images' tokens
        others = torch.arange(len(z)) != i
        means = torch.stack([F.normalize(z[others & (y == c)].mean((0, 1)), dim=0) for c in range(10)])
        hits += int(((z[i] @ means.T).argmax(-1) == y[i]).sum())
    assert hits / (len(z) * 16) >= 0.9, hits
    with pytest.raises(TeacherWeightsError, match=r"shipped teacher 'synthetic-vit' .* set repa.teacher=synthetic-vit"):
        load_teacher("synthetic-vit", name="dinov2_tiny_test", image_size=64)


# ---------------------------------------------------------------- the shapes task's assets (issue 23)

@pytest.fixture(scope="module")
def shapes_val(tmp_path_factory):
    """Val images of the shapes task's draw the assets trained on (dataset seed 1), 4 per class: never trained on
    (the assets read its train split only)."""
    from usp_scale.data.shapes import make_shapes
    from usp_scale.data.synthetic import load_split

    root = str(tmp_path_factory.mktemp("shapes"))
    make_shapes(root, per_class=4, val_per_class=4, labeled_per_class=0, size=64, seed=1)
    return load_split(root, "val"), root


def test_shipped_shapes_vae_reconstructs_unseen_shapes(shapes_val):
    from usp_scale import assets
    from usp_scale.vae import FrozenVAE
    from usp_scale.vae.named import shipped, shipped_scale

    (x, _), _ = shapes_val
    assert "shapes-f8" in shipped()
    meta = assets.read_meta("vae", "shapes-f8")
    assert meta["data"]["kind"] == "shapes" and meta["data"]["seed"] == 1   # another draw than the benchmark's 0
    vae = FrozenVAE(path="shapes-f8")                                       # hash-checked on load
    assert vae.scale == shipped_scale("shapes-f8") == meta["scaling_factor"]
    assert vae.downsample == 8 and vae.latent_channels == 4
    xi = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = vae.encode(xi)
    assert z.shape == (40, 4, 8, 8) and 0.6 < float(z.std()) < 1.6
    rec = ((vae.decode(z) + 1) * 127.5).round()
    mse = (rec - torch.from_numpy(x).permute(0, 3, 1, 2).float()).pow(2).flatten(1).mean(1)
    psnr = (10 * torch.log10(255.0 ** 2 / mse)).mean().item()
    assert psnr > 13.0, psnr                   # a random VAE gives ~10 dB; the recorded value is in asset.json
    assert abs(psnr - meta["val_psnr_db"]) < 2.5, (psnr, meta["val_psnr_db"])
    assert os.path.getsize(os.path.join(assets.verified_dir("vae", "shapes-f8"),
                                        "diffusion_pytorch_model.safetensors")) < 5e6


def test_shipped_shapes_extractor_sees_shape(shapes_val):
    """usp-shapes classifies unseen shapes far above chance (10 %), so FID on its features can see shape; the
    recorded val top-1 (asset.json, 400 images) is checked on 40 with a wide margin."""
    from usp_scale import assets
    from usp_scale.data.synthetic import load_split
    from usp_scale.eval import compute_metrics, create_extractor

    (x, y), root = shapes_val
    meta = assets.read_meta("extractor", "shapes-cnn")
    assert meta["registered_as"] == "usp-shapes" and meta["data"]["kind"] == "shapes" and meta["data"]["seed"] == 1
    assert meta["args"]["extra"] == 2
    ext = create_extractor("usp-shapes", ["logits_unbiased", "pool"])
    logits, pool = ext(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    assert pool.shape == (40, 64)
    top1 = float((logits.argmax(1).numpy() == y).mean()) * 100
    assert top1 > 30.0 and top1 > meta["val_top1"] - 25.0, (top1, meta["val_top1"])
    assert ext.cache_tag != create_extractor("usp-synthetic", ["pool"]).cache_tag
    other, _ = load_split(root, "train")                  # 40 other real images of the same draw
    noise = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    real = compute_metrics(other, os.path.join(root, "val"), ["fid"], "usp-shapes", progress=False)
    bad = compute_metrics(noise, os.path.join(root, "val"), ["fid"], "usp-shapes", progress=False)
    assert bad["fid"] > 3 * real["fid"], (bad, real)
