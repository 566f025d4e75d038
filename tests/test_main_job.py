"""The README's main job (launchers/run_tiny.sh) runs end to end, leaves every stage's outputs, and learns:
its samples (USP and the from-scratch baseline) score far better than noise and than the VAE decoding random
latents with the trained extractor, and both linear probes (pretrained and random encoder) land well above chance.
It prints its baselines and a measured verdict, records its settings, commit and wall time, and a rerun with
other settings redoes exactly the stages whose settings changed."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.timeout(3000)   # about 3 min on a quiet 2-core CPU, then a rerun; the margin is for a shared machine
def test_run_tiny_pipeline_learns_prints_its_baselines_and_never_reuses_stale_stages(tmp_path):
    out = tmp_path / "tiny"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(ROOT, "launchers", "run_tiny.sh")], env=env, capture_output=True,
                       text=True, timeout=2300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("cache_pre/manifest.json", "cache_dit/manifest.json", "pretrain/export/model.safetensors",
              "pretrain/loss_curve.png", "pretrain/config.yaml", "transfer/dit.safetensors",
              "transfer/dit.safetensors.report.json", "dit/export/ema.safetensors", "samples/grid.png",
              "samples/samples_80x64x64x3.npz", "dit_scratch/export/ema.safetensors", "samples_scratch/grid.png",
              "linprobe_random/metrics.jsonl", "summary.json"):
        assert (out / f).exists(), f
    # the caches were encoded by the shipped VAE, with its own latent scale
    man = json.load(open(out / "cache_pre" / "manifest.json"))
    assert man["vae"]["name"] == "synthetic-f8" and man["vae"]["scale"] != pytest.approx(0.18215)
    pre = [json.loads(line) for line in open(out / "pretrain" / "metrics.jsonl") if '"train"' in line]
    assert pre[-1]["loss"] < 0.7 * pre[0]["loss"], "pretraining loss did not go down"
    for run in ("dit", "dit_scratch"):
        dit = [json.loads(line) for line in open(out / run / "metrics.jsonl") if '"train"' in line]
        assert dit[-1]["loss"] < 0.5 * dit[0]["loss"], f"{run}: DiT loss did not go down"
        assert dit[-1]["step"] == 2000
    # the baseline DiT starts from scratch, the USP one from the transferred MAE
    cfg_scratch = open(out / "dit_scratch" / "config.yaml").read()
    assert "init_from: ''" in cfg_scratch and "transfer/dit.safetensors" in open(out / "dit" / "config.yaml").read()
    metrics = [json.loads(line) for line in open(out / "samples" / "metrics.jsonl")]
    fid = [m for m in metrics if m["metric"] == "fid"]
    assert len(fid) == 1 and fid[0]["num_samples"] == 80 and fid[0]["sampler"] == "ddpm"
    assert fid[0]["feature_extractor"] == "usp-synthetic"
    s = json.load(open(out / "summary.json"))
    m = s["metrics"]
    assert m["samples"]["fid"] == pytest.approx(fid[0]["value"])
    # Measured (README): samples ~20, real images ~2, random latents ~680, noise ~2600. The margins are wide;
    # an untrained or broken DiT, VAE scale or sampler lands near the random-latents value.
    for run in ("samples", "samples_scratch"):
        assert m["real"]["fid"] < m[run]["fid"] < 60, m
        assert 10 * m[run]["fid"] < m["vae_random_latents"]["fid"] < m["noise"]["fid"], m
        assert m[run]["is_mean"] > 1.5 > m["vae_random_latents"]["is_mean"], m
        assert m[run]["precision"] > 0.4 and m[run]["recall"] > 0.3, m
    for run, key in (("linprobe", "linprobe_top1"), ("linprobe_random", "linprobe_random_init_top1")):
        probe = [json.loads(line) for line in open(out / run / "metrics.jsonl") if '"eval"' in line]
        assert probe and probe[-1]["val_samples"] == 80 and s[key] == probe[-1]["top1"]
        assert probe[-1]["top1"] > 35.0 == 3.5 * s["linprobe_chance"], probe[-1]   # chance is 10 %
    # the baselines are printed beside the numbers, with the verdict it measured (not assumed)
    assert "FID / IS / KID" in r.stdout and "DiT from scratch" in r.stdout and "randomly initialised" in r.stdout
    for key, better in s["verdict"].items():
        assert better in ("USP better", "USP not better")
        line = {"dit": "DiT: USP FID", "linprobe": "Linear probe: pretrained"}[key]
        assert line in r.stdout
    # what the summary was made with
    assert s["commit"] and s["wall_seconds"] > 0 and set(s["stages_run"]) >= {"data", "pretrain", "dit", "dit_scratch"}
    assert s["settings"]["dit"]["DIT_STEPS"] == "2000" and s["settings"]["pretrain"]["MAE_EPOCHS"] == "8"

    # A rerun into the same folder with another DiT length: the DiT stages (and the summary) start fresh and say
    # why; the dataset, caches, MAE and probes are reused.
    env["DIT_STEPS"] = "200"
    r2 = subprocess.run(["bash", os.path.join(ROOT, "launchers", "run_tiny.sh")], env=env, capture_output=True,
                        text=True, timeout=1500)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert r2.stdout.count("DIT_STEPS: 2000 -> 200") == 2, r2.stdout[-3000:]      # dit and dit_scratch
    assert r2.stdout.count("reusing the finished stage") == 6, r2.stdout[-3000:]  # data caches pretrain transfer 2 probes
    s2 = json.load(open(out / "summary.json"))
    assert set(s2["stages_run"]) == {"dit", "dit_scratch"} and s2["settings"]["dit"]["DIT_STEPS"] == "200"
    for run in ("dit", "dit_scratch"):
        steps = [json.loads(line)["step"] for line in open(out / run / "metrics.jsonl") if '"train"' in line]
        assert max(steps) == 200, run
    fid2 = [json.loads(line) for line in open(out / "samples" / "metrics.jsonl")]
    assert len([x for x in fid2 if x["metric"] == "fid"]) == 1 and s2["metrics"]["samples"]["fid"] != m["samples"]["fid"]
    assert s2["linprobe_top1"] == s["linprobe_top1"]


def test_transfer_launcher_is_seeded(tmp_path):
    """The main job repeats exactly only if launchers/transfer.py initialises the layers the MAE does not provide
    (embedders, adaLN, final layer) from its --seed, not from whatever the global RNG holds."""
    import runpy

    import torch
    from safetensors.torch import load_file, save_file

    from usp_scale.models import create_model

    torch.manual_seed(0)
    mae = create_model("vit_tiny_patch_vae", img_size=8, in_chans=4)
    save_file({k: v.contiguous() for k, v in mae.state_dict().items()}, str(tmp_path / "mae.safetensors"))
    main = runpy.run_path(os.path.join(ROOT, "launchers", "transfer.py"), run_name="probe")["main"]
    outs = []
    for i, seed in enumerate(("0", "0", "1")):
        torch.manual_seed(100 + i)   # a different global state before every call
        out = str(tmp_path / f"dit{i}.safetensors")
        assert main(["--src", str(tmp_path / "mae.safetensors"), "--model", "DiT-tiny/2-VAE-simple", "--input-size",
                     "8", "--num-classes", "10", "--out", out, "--seed", seed]) == 0
        outs.append(load_file(out))
    key = "y_embedder.embedding_table.weight"
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert not torch.equal(outs[0][key], outs[2][key])
    assert torch.equal(outs[0]["blocks.0.attn.qkv.weight"], outs[2]["blocks.0.attn.qkv.weight"])
