"""USP + VA-VAE + LightningDiT integrated (issue 21): the tiny chain through the launchers on the CPU (synthetic images
-> the shipped x16 VAE synthetic-f16 (VA-VAE's layout, 32 channels) -> latent cache + channel statistics -> LightningMAE pretraining -> transfer -> LightningDiT
flow finetuning with LightningDiT's options -> sampling with the shifted Euler grid and 3-channel interval CFG),
LightningDiT's loss on DDP / FSDP2 (2 gloo ranks) equal to one process, exact resume of the trainer's sit task with
a LightningDiT on DDP / FSDP2 (DeepSpeed: slow), and the recipes against LightningDiT's published configuration."""
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_lightning_train as L  # noqa: E402
import _helpers_train as H  # noqa: E402

sys.path.insert(0, os.path.join(H.REPO, "launchers"))
SIZE = 64


def _ok(p, n=2):
    assert p.returncode == 0 and p.stdout.count(H.OK) == n, (p.stdout + p.stderr)[-5000:]


# ------------------------------------------------------------------------------------------ the tiny chain

def test_tiny_vavae_lightningdit_chain(tmp_path):
    import cache_latents
    import sample
    import transfer
    from safetensors.torch import load_file

    from usp_scale.data.synthetic import make_synthetic
    from usp_scale.training.cli import main as train

    root, cache = str(tmp_path / "synth"), str(tmp_path / "cache")
    make_synthetic(root, classes=4, per_class=6, size=SIZE, val_per_class=1, seed=5)
    cache_latents.main(["--data-root", root, "--out", cache, "--image-size", str(SIZE), "--augment", "adm",
                        "--vae-path", "synthetic-f16", "--vae-version", "f16d32", "--shard-size", "12",
                        "--batch-size", "12", "--no-progress", "--num-workers", "0"])
    stats = json.load(open(os.path.join(cache, "latent_stats.json")))
    assert stats["channels"] == 32 and stats["samples"] == 48  # 24 images x plain + flipped, fewer than 10,000
    assert stats["vae"]["name"] == "synthetic-f16" and stats["latent_shape"] == [32, 4, 4]
    # a trained VAE's posterior is narrow: the spread is the means' (a random VAE's is its posterior noise, std ~1
    # around means of std ~0.16); the shipped VAE's latents have std ~1.4 (asset.json: 1.6 over its train set)
    assert 0.9 * np.median(stats["std"]) < np.median(stats["std_of_means"]) and 0.7 < np.median(stats["std"]) < 3
    common = ["data.format=latents", "data.augment=adm", f"data.latent_cache={cache}", f"data.image_size={SIZE}",
              "vae.path=synthetic-f16",
              "vae.version=f16d32", f"vae.latent_stats={cache}", "model.img_size=4", "model.in_chans=32",
              "data.num_classes=4", "model.num_classes=4", "engine.precision=fp32", "optim.fused=false",
              "tensorboard=false", "plot=false"]
    recipe = os.path.join(H.REPO, "configs", "debug", "synthetic_pretrain.yaml")
    # without the statistics, VA-VAE latents are refused at config load (naming the key)
    with pytest.raises(Exception, match="vae.latent_stats"):
        from usp_scale.config import load_config
        load_config(recipe, [c for c in common if not c.startswith("vae.latent_stats")])
    # 1. USP pretraining of the LightningDiT-block MAE on the cached posterior means (normalised)
    mae_out = str(tmp_path / "mae")
    assert train(["--config", recipe, f"output_dir={mae_out}", "model.name=LightningMAE-tiny/1",
                  "schedule.max_steps=3", "data.latent_sample=false", *common]) == 0
    mae = os.path.join(mae_out, "export", "model.safetensors")
    # 2. transfer into LightningDiT (the launcher; every transformer key copied unchanged)
    init = str(tmp_path / "dit_init.safetensors")
    assert transfer.main(["--src", mae, "--model", "LightningDiT-tiny/1", "--out", init, "--input-size", "4",
                          "--in-chans", "32", "--num-classes", "4", "model.learn_sigma=false"]) == 0
    src, dst = load_file(mae), load_file(init)
    blocks = [k for k in src if k.startswith("blocks.")]
    assert blocks and all(torch.equal(src[k], dst[k]) for k in blocks)
    report = json.load(open(init + ".report.json"))
    # + the patch embedding's weight and bias (into x_embedder) and the fixed sin-cos table (the same 4x4 grid)
    assert set(blocks) < set(report["copied"]) and len(report["copied"]) == len(blocks) + 3
    # checkpoint.init_from with the MAE export itself transfers on the fly: the same weights as the launcher's
    from usp_scale.config import load_config
    from usp_scale.training.tasks import build_task
    direct = build_task(load_config(recipe, ["task=sit", "model.name=LightningDiT-tiny/1", "model.learn_sigma=false",
                                             f"checkpoint.init_from={mae}", *common])).build_model().state_dict()
    assert all(torch.equal(direct[k], dst[k]) for k in report["copied"])
    # 3. LightningDiT finetuning: task=sit, logit-normal t, cosine loss, EMA, from the transfer
    dit_out = str(tmp_path / "dit")
    assert train(["--task", "sit", "--config", recipe, f"output_dir={dit_out}", "model.name=LightningDiT-tiny/1",
                  "model.learn_sigma=false", "schedule.max_steps=3", "dit.time_sampling=logit_normal",
                  "dit.cosine_loss=true", f"checkpoint.init_from={init}", "ema.decay=0.9999", "optim.beta2=0.95",
                  "optim.weight_decay=0", *common], finetune=True) == 0
    recs = [json.loads(x) for x in open(os.path.join(dit_out, "metrics.jsonl")) if '"kind": "train"' in x]
    assert len(recs) == 3 and all(np.isfinite(r["loss"]) and r["loss"] > 0.5 for r in recs)  # MSE + 1 - cos
    # the two parts of the loss logged beside it (one micro-batch per logged step: they add up to it)
    for r in recs:
        assert 0 < r["cos_loss"] < 2 and r["mse_loss"] > 0, r
        assert r["mse_loss"] + r["cos_loss"] == pytest.approx(r["loss"], rel=1e-5), r
    # 4. sampling: Euler with the timestep shift, 3-channel interval CFG, decoded through the same statistics
    out = str(tmp_path / "samples")
    res = sample.main(["--model", "LightningDiT-tiny/1", "--ckpt", os.path.join(dit_out, "export", "0000003.pt"),
                       "--vae", "synthetic-f16", "--vae-version", "f16d32", "--latent-stats", cache,
                       "--image-size", str(SIZE), "model.in_chans=32", "--num-classes", "4",
                       "model.learn_sigma=false", "--sampler", "euler", "--steps", "4", "--timestep-shift", "0.3",
                       "--cfg-scale", "4", "--cfg-interval", "0.11", "1.0", "--cfg-channels", "3",
                       "--num-samples", "4", "--batch-size", "4", "--out-dir", out, "--grid", "0"])
    assert res["written"] == 4 and res["missing"] == 0
    meta = json.load(open(os.path.join(out, "sampling.json")))
    assert meta["timestep_shift"] == 0.3 and meta["cfg_channels"] == 3
    assert meta["latent_norm"]["kind"] == "channelwise" and meta["latent_norm"]["channels"] == 32
    arr = np.load(res["npz"])["arr_0"]
    assert arr.shape == (4, SIZE, SIZE, 3) and arr.dtype == np.uint8
    # the decode side inverts the statistics: without them the sampler refuses to decode VA-VAE latents
    with pytest.raises(Exception, match="vae.latent_stats"):
        sample.main(["--model", "LightningDiT-tiny/1", "--ckpt", os.path.join(dit_out, "export", "0000003.pt"),
                     "--vae", "synthetic-f16", "--vae-version", "f16d32", "--image-size", str(SIZE),
                     "model.in_chans=32", "--num-classes", "4", "model.learn_sigma=false", "--sampler", "euler",
                     "--steps", "2", "--num-samples", "1", "--out-dir", str(tmp_path / "s2")])


# ------------------------------------------------------------------------------------------ engines

def test_lightningdit_ddp_and_fsdp2_equal_one_process(tmp_path):
    """LightningDiT's loss (logit-normal t, cosine term) on the same global batches: 2 gloo ranks == local."""
    p = H.torchrun(["tests/_helpers_lightning_train.py", "--out", str(tmp_path), "--cases", "ddp", "fsdp2"])
    _ok(p)
    ref_l, ref_sd = L.lightning_losses(H.engine_cfg("local"))
    res = json.load(open(tmp_path / "lightning_equiv.json"))
    for case in ("ddp", "fsdp2"):
        assert res[case]["losses"] == pytest.approx(ref_l, rel=1e-6), case
        for k, v in ref_sd.items():
            assert torch.allclose(torch.tensor(res[case]["state"][k]), torch.tensor(v), atol=1e-6, rtol=0), (case, k)


def _check_resume(path, specs):
    res = json.load(open(path))
    for spec in specs:
        r = res[spec]
        assert len(r["full"]) == 10 and r["full"] == r["split"], spec  # exact, per step
        assert r["model_equal"] and r["ema_equal"], spec
    return res


def test_lightningdit_sit_exact_resume_ddp_fsdp2(tmp_path):
    """The trainer's sit task with LightningDiT-tiny/1 and LightningDiT's options: 10 steps == 5 + resume + 5."""
    specs = ["ddp", "fsdp2"]
    p = H.torchrun(["tests/_helpers_train.py", "resume", "--out", str(tmp_path), "--cases", *specs,
                    "--model", "LightningDiT-tiny/1", "--set", *L.SIT_SET])
    _ok(p)
    res = _check_resume(tmp_path / "resume.json", specs)
    assert res["ddp"]["full"] == pytest.approx(res["fsdp2"]["full"], rel=1e-5)


def test_lightning_mae_pretraining_exact_resume_ddp_fsdp2(tmp_path):
    """USP for LightningDiT: the LightningMAE's masked pretraining (the trainer's pretrain task, 32-channel 4x4
    latents, patch 1) on 2 gloo ranks: 10 steps == 5 + resume + 5, exactly, on ddp and fsdp2."""
    specs = ["ddp", "fsdp2"]
    p = H.torchrun(["tests/_helpers_train.py", "resume", "--out", str(tmp_path), "--cases", *specs,
                    "--model", "LightningMAE-tiny/1", "--set", "model.img_size=4", "model.in_chans=32"])
    _ok(p)
    _check_resume(tmp_path / "resume.json", specs)


@pytest.mark.slow
def test_lightningdit_deepspeed_equal_and_exact_resume(tmp_path):
    p = H.torchrun(["tests/_helpers_lightning_train.py", "--out", str(tmp_path), "--cases", "ds2"], timeout=600)
    _ok(p)
    ref_l, _ = L.lightning_losses(H.engine_cfg("local"))
    assert json.load(open(tmp_path / "lightning_equiv.json"))["ds2"]["losses"] == pytest.approx(ref_l, rel=1e-5)
    out = tmp_path / "resume"
    out.mkdir()
    p = H.torchrun(["tests/_helpers_train.py", "resume", "--out", str(out), "--cases", "deepspeed:2",
                    "--model", "LightningDiT-tiny/1", "--set", *L.SIT_SET], timeout=600)
    _ok(p)
    _check_resume(out / "resume.json", ["deepspeed:2"])


# ------------------------------------------------------------------------------------------ recipes

# hustvl/LightningDiT configs/lightningdit_xl_vavae_f16d32.yaml and train.py (docs/method.md §10)
LIGHTNINGDIT_64EP = {
    "task": "sit", "model.name": "LightningDiT-XL/1", "model.img_size": 16, "model.in_chans": 32,
    "model.learn_sigma": False, "model.class_dropout_prob": 0.1, "vae.version": "f16d32", "vae.latent_multiplier": 1.0,
    "data.image_size": 256, "data.format": "latents", "data.latent_sample": True, "optim.name": "adamw",
    "optim.lr": 2e-4, "optim.weight_decay": 0.0, "optim.beta1": 0.9, "optim.beta2": 0.95, "optim.clip_grad": 0.0,
    "schedule.name": "constant", "schedule.max_steps": 80000, "schedule.warmup_steps": 0, "ema.decay": 0.9999,
    "dit.time_sampling": "logit_normal", "dit.cosine_loss": True, "engine.precision": "bf16",
    "eval.sampler": "euler", "eval.steps": 249, "eval.timestep_shift": 0.3, "eval.cfg_scale": 10.0,
    "eval.cfg_interval_low": 0.11, "eval.cfg_interval_high": 1.0, "eval.cfg_channels": 3,
}


@pytest.mark.parametrize("recipe", ["lightningdit_xl1_256_vavae.yaml", "lightningdit_xl1_256_vavae_usp.yaml"])
def test_lightningdit_recipes_are_the_reference_configuration(recipe):
    from usp_scale.config import load_config
    from usp_scale.config.resolve import resolve_job
    from usp_scale.config.validate import get

    cfg = load_config(os.path.join(H.REPO, "configs", "finetune", recipe))
    for key, want in LIGHTNINGDIT_64EP.items():
        assert get(cfg, key) == want, (recipe, key)
    assert cfg.vae.path.endswith(".pt") and cfg.vae.latent_stats  # names its VAE and its statistics
    for world in (8, 16, 64):  # global batch 1024 on any of these
        fresh = load_config(os.path.join(H.REPO, "configs", "finetune", recipe))
        assert resolve_job(fresh, world).global_batch == 1024
    assert bool(cfg.checkpoint.init_from) == recipe.endswith("_usp.yaml")


def test_lightning_mae_pretraining_recipe_transfers_to_the_finetuning_model():
    from usp_scale.config import load_config
    from usp_scale.models import create_model

    pre = load_config(os.path.join(H.REPO, "configs", "pretrain", "usp_lightning_xl1_vavae.yaml"))
    fin = load_config(os.path.join(H.REPO, "configs", "finetune", "lightningdit_xl1_256_vavae_usp.yaml"))
    assert pre.task == "pretrain" and pre.model.name == "LightningMAE-XL/1" and pre.model.in_chans == 32
    assert (pre.vae.version, pre.vae.path, pre.vae.latent_stats) == (fin.vae.version, fin.vae.path,
                                                                       fin.vae.latent_stats)
    # the pretrained encoder's blocks are the finetuned model's (names and shapes; built on the meta device)
    mae = create_model(pre.model.name, img_size=pre.model.img_size, in_chans=32, device="meta").state_dict()
    dit = create_model(fin.model.name, input_size=16, in_channels=32, num_classes=1000, device="meta").state_dict()
    blocks = [k for k in mae if k.startswith("blocks.")]
    assert len(blocks) > 28 and all(mae[k].shape == dit[k].shape for k in blocks)
    assert mae["pos_embed"].shape[1] == 14 * 14 and dit["pos_embed"].shape[1] == 16 * 16  # resampled by transfer
