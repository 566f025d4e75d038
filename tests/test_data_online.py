"""The paper's pretraining inputs, checked on the CPU: online encoding gives a fresh RandomResizedCrop + flip of every
image every epoch and the posterior mean; the overlapped producer equals the synchronous reference and resumes
exactly; the GPU decode+crop loader draws the PIL path's crops (here on the CPU, libjpeg-turbo on both sides)."""
import pytest
import torch

from _helpers_data import data_cfg, synth_clean  # noqa: F401
from usp_scale.config import VAEConfig
from usp_scale.data import build_image_loader, build_loader
from usp_scale.data.datasets import build_dataset
from usp_scale.data.loaders import OnlineLatentLoader
from usp_scale.data.online import OnlineEncodingLoader
from usp_scale.data.transforms import build_transform, sample_seed, seeded
from usp_scale.vae import FrozenVAE


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    out = list(loader)
    return torch.cat([b["latents"] for b in out]), torch.cat([b["index"] for b in out])


def test_online_pretraining_inputs_are_a_fresh_crop_per_epoch_and_the_posterior_mean(synth_clean):
    cfg = data_cfg(synth_clean["root"], augment="pretrain", image_size=32, batch_size=4)
    vae_cfg = VAEConfig(path="tiny-random", posterior="mean")
    loader = build_loader(cfg, vae_cfg, seed=3)
    assert isinstance(loader, OnlineEncodingLoader) and loader.images.backend == "torchvision"
    vae = FrozenVAE.from_config(vae_cfg)
    ds = build_dataset(cfg.root, cfg.split, cfg.format)
    tf = build_transform("pretrain", 32, 0.2)
    per_epoch = {}
    for epoch in (0, 1, 2):
        z, idx = _epoch(loader, epoch)
        # the expected input: the PIL RandomResizedCrop(0.2-1, bicubic) + flip drawn for (seed, epoch, index)
        imgs = []
        for i in idx.tolist():
            with seeded(sample_seed(3, epoch, i, 0)):
                imgs.append(tf(ds.load(i)[0]))
        mean, _ = vae.encode_moments(torch.stack(imgs))
        assert torch.allclose(z, mean * vae.scale, atol=1e-6, rtol=0)      # the mean, not a sample
        again, _ = _epoch(loader, epoch)
        assert torch.equal(z, again)                                           # no posterior noise
        per_epoch[epoch] = dict(zip(idx.tolist(), z))
    common = set(per_epoch[0]) & set(per_epoch[1]) & set(per_epoch[2])
    assert len(common) == len(per_epoch[0])
    # every image gets a new crop every epoch (the latent cache with K views repeats at most 2K inputs)
    fresh = sum(not torch.equal(per_epoch[a][i], per_epoch[b][i]) for i in common for a, b in ((0, 1), (1, 2), (0, 2)))
    assert fresh == 3 * len(common)


def test_crop_distribution_of_the_pretrain_transform():
    """Area fraction in [0.2, 1], flips with probability 1/2, and the mean area of the rule "area ~ U(0.2, 1),
    log-aspect ~ U(log 3/4, log 4/3), retry (up to 10 times) until the rounded box fits" computed independently;
    the retries reject large boxes of extreme aspect, so the mean area is below 0.6."""
    tf = build_transform("pretrain", 32, 0.2)
    rrc, flip = tf.transforms[0], tf.transforms[1]
    from PIL import Image
    img = Image.new("RGB", (120, 90))
    areas, flips = [], []
    for k in range(2000):
        with seeded(sample_seed(0, 0, k, 0)):
            top, left, h, w = rrc.get_params(img, rrc.scale, rrc.ratio)
            flips.append(bool(torch.rand(1) < flip.p))
        areas.append(h * w / (120 * 90))
        assert 0 <= top <= 90 - h and 0 <= left <= 120 - w
    areas = torch.tensor(areas)
    assert areas.min() >= 0.2 - 0.01 and areas.max() <= 1.0
    import math
    import random
    rng, ref = random.Random(0), []
    for _ in range(20000):
        for _ in range(10):
            a = 120 * 90 * rng.uniform(0.2, 1.0)
            r = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(a * r)), round(math.sqrt(a / r))
            if 0 < w <= 120 and 0 < h <= 90:
                ref.append(w * h / (120 * 90))
                break
        else:
            ref.append(1.0)   # fallback: the whole image (its aspect 4/3 is inside the range)
    assert abs(areas.mean().item() - sum(ref) / len(ref)) < 0.02
    assert 0.45 < sum(flips) / len(flips) < 0.55


@pytest.mark.parametrize("posterior", ["mean", "sample"])
def test_overlapped_producer_equals_the_reference_and_resumes(synth_clean, posterior):
    cfg = data_cfg(synth_clean["root"], augment="pretrain", image_size=32, batch_size=4)
    vae = FrozenVAE(posterior=posterior)

    def make(cls, **kw):
        return cls(build_image_loader(cfg, rank=1, world_size=2, seed=5), vae, posterior=posterior, **kw)

    ref, fast = make(OnlineLatentLoader), make(OnlineEncodingLoader, overlap=True)
    for epoch in (0, 1):
        a, ia = _epoch(ref, epoch)
        b, ib = _epoch(fast, epoch)
        assert torch.equal(a, b) and torch.equal(ia, ib)
    fast.set_epoch(1)
    it = iter(fast)
    next(it)
    state = fast.state_dict()               # one batch handed out, one encoded ahead and dropped
    it.close()
    resumed = make(OnlineEncodingLoader, overlap=True)
    resumed.load_state_dict(state)
    rest = torch.cat([x["latents"] for x in resumed])
    full, _ = _epoch(ref, 1)
    assert torch.equal(rest, full[len(full) - len(rest):]) and len(rest) == len(full) - 4


def test_vae_encode_graphs_equal_the_reference_encoder():
    vae = FrozenVAE(seed=1)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    m = vae.model
    h = m.quant_conv(m.encoder(x.contiguous(memory_format=torch.channels_last)))
    mean, logvar = h.chunk(2, dim=1)
    got_m, got_l = vae.encode_moments(x)
    assert torch.equal(got_m, mean) and torch.equal(got_l, logvar)
    assert torch.allclose(vae.encode(x, posterior="mean"), mean * vae.scale, atol=1e-6, rtol=0)
    # official precision: fp32 weights under fp16 autocast (latents carry fp16 precision) vs weights cast to bf16
    ac = FrozenVAE(seed=1, dtype="fp16", autocast=True)
    assert ac.model.encoder.conv_in.weight.dtype == torch.float32
    err_ac = (ac.encode(x) - mean * vae.scale).abs().max()
    assert 0 < err_ac < 2e-3
    assert FrozenVAE(seed=1, dtype="bf16").model.encoder.conv_in.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("augment,train", [("pretrain", True), ("eval", False)])
def test_gpu_decode_loader_draws_the_pil_crops(synth_clean, augment, train):
    """data.loader=gpu on the CPU: the same files, order and crops as the PIL loader; pixels within resampling
    rounding (the JPEG decoder is libjpeg-turbo on both sides here; nvJPEG on a GPU is measured there)."""
    out = {}
    for backend in ("torchvision", "gpu"):
        ld = build_image_loader(data_cfg(synth_clean["root"], loader=backend, augment=augment), train=train, seed=1)
        for e in (0, 1):
            ld.set_epoch(e)
            out[backend, e] = list(ld)
    for e in (0, 1):
        tv = torch.cat([b["images"] for b in out["torchvision", e]])
        gp = torch.cat([b["images"] for b in out["gpu", e]])
        assert torch.equal(torch.cat([b["index"] for b in out["torchvision", e]]),
                           torch.cat([b["index"] for b in out["gpu", e]]))
        diff = (tv - gp).abs() * 127.5
        print(f"\n[measured] gpu-loader (CPU decode) vs PIL, {augment} epoch {e}: mean |diff| {diff.mean():.3f}, "
              f"max {diff.max():.1f} grey levels")
        assert diff.mean() < 0.25 and diff.max() <= 8
    if augment == "pretrain":  # and a wrong crop would be far off: epoch 0's crops against epoch 1's pixels
        a = torch.cat([b["images"] for b in out["torchvision", 0]])
        b = torch.cat([b["images"] for b in out["gpu", 1]])
        assert (a - b).abs().mean() * 127.5 > 5


def test_gpu_decode_loader_reports_corrupt_files():
    import tempfile
    from usp_scale.data.synthetic import make_synthetic
    root = tempfile.mkdtemp()
    info = make_synthetic(root, classes=2, per_class=4, size=32, val_per_class=1, seed=2, corrupt=2)
    ld = build_image_loader(data_cfg(root, loader="gpu", augment="pretrain"), train=True)
    n = sum(len(b["labels"]) for b in ld)
    assert sorted(ld.corrupt) == sorted(info["corrupt"]) and n == 8 - 2


@pytest.mark.slow
def test_online_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/data/bench_online.py --smoke: every row measured (tiny VAE, MAE-tiny, eager), report written."""
    import importlib.util
    import json
    import os

    from _helpers_data import REPO
    spec = importlib.util.spec_from_file_location("bench_online", os.path.join(REPO, "benchmarks/data/bench_online.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "online.json"))["rows"]
    names = [r["name"] for r in rows]
    assert any("baseline" in n for n in names) and any(n.startswith("cached") for n in names)
    assert any("overlap on" in n for n in names) and all(r["img_per_s"] > 0 for r in rows)
