"""launchers/sample.py end to end with tiny registry models and a tiny x8 diffusers VAE."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from usp_scale.sample import read_npz_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launchers"))
import sample as sample_launcher  # noqa: E402

sys.path.pop(0)


def _tiny_vae(path):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=64)
    vae.save_pretrained(path)
    return str(path)


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from usp_scale.models import create_model
    from usp_scale.fileio import save_safetensors
    d = tmp_path_factory.mktemp("assets")
    vae = _tiny_vae(d / "vae")
    dit, ema = _randomise(create_model("DiT-tiny/2"), 1), _randomise(create_model("DiT-tiny/2"), 2)
    torch.save({"model": dit.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": None}, d / "official.pt")
    save_safetensors(ema, str(d / "ema.safetensors"))
    save_safetensors(_randomise(create_model("SiT-tiny/2"), 3), str(d / "sit.safetensors"))
    return d, vae


def _args(d, vae, out, ckpt, model="DiT-tiny/2", extra=()):
    return ["--model", model, "--ckpt", str(d / ckpt), "--vae", vae, "--image-size", "64", "--num-classes", "10",
            "--num-samples", "6", "--batch-size", "2", "--steps", "4", "--out-dir", str(out), "--no-progress",
            "--grid", "4", *extra]


def test_dit_official_checkpoint_uses_ema(assets, tmp_path):
    d, vae = assets
    r1 = sample_launcher.main(_args(d, vae, tmp_path / "a", "official.pt"))
    r2 = sample_launcher.main(_args(d, vae, tmp_path / "b", "ema.safetensors"))
    r3 = sample_launcher.main(_args(d, vae, tmp_path / "c", "official.pt", extra=["--weights", "model"]))
    a, b, c = (read_npz_images(r["npz"]) for r in (r1, r2, r3))
    assert a.shape == (6, 64, 64, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert os.path.exists(r1["grid"]) and os.path.exists(tmp_path / "a" / "sampling.json")


def test_sit_sde_with_cfg_and_bf16(assets, tmp_path):
    d, vae = assets
    r = sample_launcher.main(_args(d, vae, tmp_path / "s", "sit.safetensors", model="SiT-tiny/2",
                                   extra=["--cfg-scale", "2.0", "--precision", "bf16"]))
    assert read_npz_images(r["npz"]).shape == (6, 64, 64, 3)
    with pytest.raises(ValueError, match="does not fit"):
        sample_launcher.main(_args(d, vae, tmp_path / "x", "ema.safetensors",
                                   extra=["--model-kwargs", '{"learn_sigma": false}']))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(assets, tmp_path):
    d, vae = assets
    # Same thread count and batch shapes in both runs (8 samples, batch 2: every batch is full), so the
    # only difference is which process makes which index; CPU GEMM rounding depends on both. Both runs start a
    # fresh interpreter, so no global state left by other tests in this worker (threads, matmul precision) differs.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = os.path.join(ROOT, "launchers", "sample.py")
    one = subprocess.run([sys.executable, launcher, *_args(d, vae, tmp_path / "one", "ema.safetensors"),
                          "--num-samples", "8", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stdout + one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), launcher,
           *_args(d, vae, tmp_path / "two", "ema.safetensors"), "--num-samples", "8", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert "[rank 0] wrote 4 images" in out.stdout, out.stdout + out.stderr
    two = tmp_path / "two" / "samples_8x64x64x3.npz"
    single = tmp_path / "one" / "samples_8x64x64x3.npz"
    assert np.array_equal(read_npz_images(str(two)), read_npz_images(str(single)))


def test_fid_hook_with_registry_dit_and_vae(assets, tmp_path):
    """evaluate_fid on a real DiT-tiny + DDPM + VAE: shapes and labels inferred from the model."""
    from diffusers import AutoencoderKL
    from usp_scale.diffusion import create_diffusion
    from usp_scale.eval import evaluate_fid
    from usp_scale.models import create_model
    from usp_scale.sample import write_npz
    d, vae_path = assets
    vae = AutoencoderKL.from_pretrained(vae_path, local_files_only=True).eval()
    vae.scale = 0.18215
    model = _randomise(create_model("DiT-tiny/2"), 4)
    ref = np.random.RandomState(0).randint(0, 256, (8, 64, 64, 3)).astype(np.uint8)
    write_npz(str(tmp_path / "ref.npz"), ref)
    cfg = {"sampler": "ddim", "steps": 3, "batch_size": 4, "feature_extractor": "usp-tiny",
           "fid_reference": str(tmp_path / "ref.npz"), "cfg_scale": 1.5}
    r = evaluate_fid(model, create_diffusion(""), vae, cfg, 8, cache_dir=str(tmp_path / "c"))
    assert r["num_samples"] == 8 and r["fid"] > 0 and r["sampler"] == "ddim" and r["cfg_scale"] == 1.5


def test_infer_shape_through_wrappers():
    from usp_scale.models import create_model
    from usp_scale.sample import infer_latent_shape, infer_num_classes

    class Wrapper(torch.nn.Module):  # DDP / DeepSpeed style
        def __init__(self, m):
            super().__init__()
            self.module = m
    m = create_model("DiT-tiny/2")
    w = Wrapper(torch.compile(m))
    assert infer_latent_shape(w) == (4, 8, 8) and infer_num_classes(w) == 10


@pytest.mark.slow
def test_killed_job_resumes_to_the_same_images(assets, tmp_path):
    """SIGKILL a sampling process mid-run, rerun it: the result equals an uninterrupted run."""
    import signal
    import time
    d, vae = assets
    args = _args(d, vae, tmp_path / "k", "ema.safetensors") + ["--num-samples", "12", "--batch-size", "1",
                                                                 "--steps", "20"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launchers", "sample.py"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((tmp_path / "k").glob("0*.png"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((tmp_path / "k").glob("0*.png")))
    assert 3 <= done < 12, done
    res = sample_launcher.main(args)
    assert res["skipped"] == done and res["written"] == 12 - done
    ref = sample_launcher.main(_args(d, vae, tmp_path / "ref", "ema.safetensors")
                               + ["--num-samples", "12", "--batch-size", "1", "--steps", "20"])
    assert np.array_equal(read_npz_images(res["npz"]), read_npz_images(ref["npz"]))


@pytest.mark.parametrize("ckpt", ["official.pt", "ema.safetensors"])
def test_resume_after_the_weights_were_replaced_is_refused(assets, tmp_path, ckpt):
    """Issue 18 item 2: samples resumed into a folder after the weights at the same --ckpt path were replaced used to
    be reused silently (sampling.json recorded the path only); the content is recorded and compared now. The
    temp files of a killed sampler are removed at the next start."""
    import shutil

    from usp_scale.fileio import save_safetensors
    from usp_scale.models import create_model

    d, vae = assets
    work = tmp_path / "w"
    work.mkdir()
    shutil.copy(d / ckpt, work / ckpt)
    out = tmp_path / "out"
    sample_launcher.main(_args(work, vae, out, ckpt, extra=["--max-batches", "1"]))
    dead = subprocess.Popen(["true"])
    dead.wait()
    litter = out / f"000005.png.tmp{dead.pid}"
    litter.write_bytes(b"partial")
    sample_launcher.main(_args(work, vae, out, ckpt, extra=["--max-batches", "1"]))  # same weights: resumes
    assert not litter.exists()
    other = _randomise(create_model("DiT-tiny/2"), 7)
    if ckpt.endswith(".pt"):
        torch.save({"model": other.state_dict(), "ema": other.state_dict(), "opt": {}, "args": None}, work / ckpt)
    else:
        save_safetensors(other, str(work / ckpt))
    with pytest.raises(ValueError, match=r"ckpt_content=.*was replaced since these samples were made"):
        sample_launcher.main(_args(work, vae, out, ckpt))
