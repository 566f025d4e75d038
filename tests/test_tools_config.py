"""The tool launchers read the trainer's config (usp_scale.config.cli): a flag and the dotted override of its key give
the same config, --help names the key of every flag, a recipe configures the tool, only the tool's sections are
checked, and no tool has a default VAE (a missing one is an error naming vae.path). No model runs here."""
import os
import runpy

import pytest

from usp_scale.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIT = os.path.join(ROOT, "configs", "debug", "tiny_dit.yaml")


def _launcher(name):
    return runpy.run_path(os.path.join(ROOT, "launchers", name), run_name="probe")


SAMPLE, CACHE, TRANSFER = _launcher("sample.py"), _launcher("cache_latents.py"), _launcher("transfer.py")


def _dump(cfg):
    import dataclasses

    return dataclasses.asdict(cfg)


def test_sample_flags_are_aliases_of_keys():
    flags = SAMPLE["load_sample_config"](
        ["--model", "SiT-tiny/2", "--ckpt", "w.safetensors", "--vae", "tiny-random", "--image-size", "64",
         "--num-classes", "10", "--steps", "4", "--batch-size", "2", "--cfg-scale", "2.0", "--cfg-interval", "0.1",
         "0.9", "--out-dir", "out", "--no-npz", "--tf32", "--seed", "3", "--no-progress"])
    keys = SAMPLE["load_sample_config"](
        ["model.name=SiT-tiny/2", "sample.ckpt=w.safetensors", "vae.path=tiny-random", "data.image_size=64",
         "model.num_classes=10", "eval.steps=4", "eval.batch_size=2", "eval.cfg_scale=2.0",
         "eval.cfg_interval_low=0.1", "eval.cfg_interval_high=0.9", "sample.out_dir=out", "sample.npz=false",
         "engine.tf32=true", "eval.seed=3", "progress=false"])
    assert _dump(flags) == _dump(keys)
    assert flags.model.img_size == 8 and flags.eval.sampler == "auto"      # 64 px / the d8 VAE; SiT: the SDE


def test_sample_help_names_the_key_of_every_flag(capsys):
    with pytest.raises(SystemExit):
        SAMPLE["load_sample_config"](["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for a in SAMPLE["ALIASES"]:
        assert f"= {' '.join(a.targets)}" in text, a.flags


def test_sample_from_a_recipe_and_its_errors():
    cfg = SAMPLE["load_sample_config"](["--config", TINY_DIT, "--ckpt", "w.safetensors", "--out-dir", "o"])
    assert (cfg.model.name, cfg.model.img_size, cfg.vae.path, cfg.eval.steps) == \
        ("DiT-tiny/2-VAE-simple", 8, "synthetic-f8", 50)                 # the recipe's model, VAE and sampling
    with pytest.raises(ConfigError, match=r"vae\.path=''.*no VAE given"):  # no default VAE
        SAMPLE["load_sample_config"](["--model", "DiT-tiny/2", "--ckpt", "w", "--out-dir", "o"])
    with pytest.raises(ConfigError, match=r"eval\.sampler='sde'.*samples with auto, ddpm, ddim"):
        SAMPLE["load_sample_config"](["--config", TINY_DIT, "--ckpt", "w", "--out-dir", "o", "--sampler", "sde"])
    with pytest.raises(ConfigError, match=r"required key 'sample\.ckpt' is missing"):
        SAMPLE["load_sample_config"](["--config", TINY_DIT, "--out-dir", "o"])
    with pytest.raises(ConfigError, match=r"model\.name='vit_tiny_patch_vae'.*needs a DiT or SiT"):
        SAMPLE["load_sample_config"](["--model", "vit_tiny_patch_vae", "--ckpt", "w", "--out-dir", "o", "--vae",
                                      "none"])


def test_cache_latents_has_no_default_vae():
    base = ["--data-root", "data", "--out", "cache"]
    with pytest.raises(ConfigError, match=r"vae\.path=''.*no VAE given"):
        CACHE["load_cache_config"](base)
    cfg = CACHE["load_cache_config"](base + ["--vae-path", "tiny-random", "--views", "2", "cache.dtype=bf16"])
    assert (cfg.vae.path, cfg.cache.views, cfg.cache.dtype, cfg.data.root) == ("tiny-random", 2, "bf16", "data")


def test_transfer_target_from_the_model_or_the_recipe():
    load = TRANSFER["load_transfer_config"]
    args = ["--src", "mae.pth", "--out", "x.safetensors"]
    assert load(args + ["--model", "DiT-tiny/2-VAE-simple", "--input-size", "8"]).task == "dit"
    assert load(args + ["--model", "SiT-tiny/2"]).task == "sit"
    assert load(args + ["--model", "vit_tiny_patch16_vae", "--global-pool", "token"]).task == "linprobe"
    assert load(args + ["--model", "vit_tiny_patch16_vae"]).task == "cls"
    cfg = load(args + ["--config", TINY_DIT])                              # the model the recipe finetunes
    assert (cfg.task, cfg.model.name, cfg.model.img_size) == ("dit", "DiT-tiny/2-VAE-simple", 8)
    with pytest.raises(ConfigError, match="masked autoencoder"):
        load(args + ["--model", "vit_tiny_patch_vae"])
