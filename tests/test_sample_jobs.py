"""CFG, decoding, PNG/npz output, index determinism across world sizes, resume, multi-process sampling."""
import os
import socket

import numpy as np
import pytest
import torch

from _helpers_sample import GaussianVelocity
from usp_scale.diffusion import create_diffusion
from usp_scale.sample import (CFGModel, IndexedNoise, build_sampler, make_decoder, make_grid, read_npz_images,
                              read_png, run_sampling, to_uint8, write_npz)
from usp_scale.transport import create_transport

MUS = [-0.6, -0.2, 0.2, 0.6]  # per-class pixel means: visibly different grey levels
SHAPE = (3, 8, 8)


def _job(out_dir, world=1, batch=4, n=10, max_batches=None, model=None, seed=3):
    model = model or GaussianVelocity(MUS, 0.2)
    sampler = build_sampler("sde", create_transport(), steps=12)
    res = [run_sampling(model, sampler, make_decoder(None), num_samples=n, out_dir=str(out_dir), latent_shape=SHAPE,
                        num_classes=len(MUS), seed=seed, batch_size=batch, rank=r, world_size=world,
                        progress=False, max_batches=max_batches, meta={"sampler": "sde"})
           for r in reversed(range(world))]  # rank 0 last: it assembles the npz once all PNGs exist
    return res[::-1], model


def test_cfg_wrapper():
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        # conditional output = 1 + y, unconditional (y = null = 5) = 0, on 8 channels
        val = torch.where(y == 5, torch.zeros_like(y), 1 + y).float().view(-1, 1, 1, 1)
        return val.expand(len(x), 8, 2, 2).clone()
    x, y = torch.zeros(3, 4, 2, 2), torch.tensor([0, 1, 2])
    t = torch.tensor([10, 10, 10])
    out = CFGModel(model, 1.0, 5)(x, t, y)
    assert calls == [3] and torch.equal(out, model(x, t, y))
    calls.clear()
    out = CFGModel(model, 4.0, 5)(x, t, y)
    assert calls == [6]
    exp = (4.0 * (1 + y)).float().view(-1, 1, 1)
    assert torch.equal(out[:, :4], exp.unsqueeze(1).expand(3, 4, 2, 2))           # guided: all latent channels
    assert torch.equal(out[:, 4:], (1 + y).float().view(-1, 1, 1, 1).expand(3, 4, 2, 2))  # variance: conditional
    out3 = CFGModel(model, 4.0, 5, guided_channels=3)(x, t, y)                     # the official 3 channels
    assert torch.equal(out3[:, :3], out[:, :3])
    assert torch.equal(out3[:, 3:], (1 + y).float().view(-1, 1, 1, 1).expand(3, 5, 2, 2))
    calls.clear()
    iv = CFGModel(model, 4.0, 5, interval=(0, 5))
    assert torch.equal(iv(x, t, y), model(x, t, y)) and calls == [3, 3]            # outside: no uncond pass
    mixed = iv(x, torch.tensor([1, 10, 3]), y)
    assert torch.equal(mixed[1], model(x, t, y)[1]) and torch.equal(mixed[0, :4], out[0, :4])


def test_to_uint8_and_decoder_scale():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    u = to_uint8(x)
    assert u.shape == (1, 1, 6, 3) and u.dtype == torch.uint8
    assert u[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]

    class SpyVAE:  # the project's wrapper convention: decode takes model-space latents
        scale = 0.5
        seen = None

        def decode(self, z):
            SpyVAE.seen = z
            return torch.zeros(z.shape[0], 3, 4, 4)
    z = torch.ones(2, 4, 1, 1)
    img = make_decoder(SpyVAE())(z)
    assert torch.equal(SpyVAE.seen, z) and img.shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="own scale"):
        make_decoder(SpyVAE(), scale=0.18215)


def test_decoder_with_tiny_diffusers_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                        sample_size=8).eval()
    z = torch.randn(2, 4, 8, 8)
    img = make_decoder(vae, scale=0.18215)(z)
    ref = to_uint8(vae.decode(z / 0.18215).sample)
    assert img.shape == (2, 8, 8, 3) and torch.equal(img, ref)
    with pytest.raises(ValueError, match="scale"):
        make_decoder(vae)


def test_npz_roundtrip_and_grid(tmp_path):
    arr = np.random.RandomState(0).randint(0, 256, (5, 6, 7, 3)).astype(np.uint8)
    p = write_npz(str(tmp_path / "a.npz"), arr)
    back = read_npz_images(p)
    assert back.dtype == np.uint8 and np.array_equal(back, arr)
    assert list(np.load(p).keys()) == ["arr_0"]
    g = make_grid(arr, nrow=3, pad=2)
    assert g.shape == (2 * 8 + 2, 3 * 9 + 2, 3) and np.array_equal(g[2:8, 2:9], arr[0])
    with pytest.raises(ValueError):
        write_npz(str(tmp_path / "b.npz"), arr.astype(np.float32))


def test_indexed_noise_is_per_index():
    a = IndexedNoise([0, 1, 2, 3], seed=7)
    b = IndexedNoise([2, 0], seed=7)
    la, lb = a.labels(1000), b.labels(1000)
    za, zb = a.randn((2, 3)), b.randn((2, 3))
    assert lb.tolist() == [la[2].item(), la[0].item()]
    assert torch.equal(zb[0], za[2]) and torch.equal(zb[1], za[0])
    assert not torch.equal(za[0], za[1])
    assert IndexedNoise([5], 7).labels(10, "balanced").tolist() == [5]


def test_world_size_does_not_change_images(tmp_path):
    r1, _ = _job(tmp_path / "w1", world=1, batch=4)
    r2, _ = _job(tmp_path / "w2", world=2, batch=3)
    a = read_npz_images(r1[0]["npz"])
    b = read_npz_images(r2[0]["npz"])
    assert a.shape == (10, 8, 8, 3) and np.array_equal(a, b)
    assert r2[1]["npz"] is None  # only rank 0 assembles
    for i in range(10):
        assert np.array_equal(read_png(str(tmp_path / "w1" / f"{i:06d}.png")), a[i])
    assert os.path.exists(r1[0]["grid"])
    # class means show up: images are not all the same grey level
    assert a.reshape(10, -1).mean(1).std() > 10
    # a different seed gives different images
    r3, _ = _job(tmp_path / "s", seed=4)
    assert not np.array_equal(read_npz_images(r3[0]["npz"]), a)


def test_resume_interrupted_job(tmp_path):
    ref, _ = _job(tmp_path / "full", batch=4)
    part, m1 = _job(tmp_path / "job", batch=4, max_batches=1)
    assert part[0]["written"] == 4 and part[0]["npz"] is None and part[0]["missing"] == 6
    # a half-written file from a killed job is not mistaken for a finished image
    (tmp_path / "job" / "000009.png.tmp").write_bytes(b"garbage")
    rest, m2 = _job(tmp_path / "job", batch=4)
    assert rest[0]["skipped"] == 4 and rest[0]["written"] == 6
    assert m2.calls == 2 * 12  # two batches of the remaining 6, 12 SDE steps each
    assert np.array_equal(read_npz_images(rest[0]["npz"]), read_npz_images(ref[0]["npz"]))
    # mixing a different job into the folder is refused
    with pytest.raises(ValueError, match="seed"):
        _job(tmp_path / "job", seed=99)


def test_ddpm_sampler_through_job(tmp_path):
    from _helpers_sample import GaussianEps
    model = GaussianEps(MUS, 0.2, create_diffusion("").alphas_cumprod)
    sampler = build_sampler("ddpm", create_diffusion(""), steps=20)
    assert sampler.process.num_timesteps == 20
    res = run_sampling(model, sampler, make_decoder(None), num_samples=6, out_dir=str(tmp_path), latent_shape=SHAPE,
                       num_classes=4, seed=0, batch_size=6, progress=False)
    ims = read_npz_images(res["npz"]).astype(np.float64)
    labels = IndexedNoise(range(6), 0).labels(4)
    for i in range(6):  # each image's mean grey level follows its class
        assert ims[i].mean() == pytest.approx(127.5 * MUS[labels[i]] + 127.5, abs=12)
    with pytest.raises(TypeError):
        build_sampler("sde", create_diffusion(""))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    sampler = build_sampler("sde", create_transport(), steps=12)
    res = run_sampling(GaussianVelocity(MUS, 0.2), sampler, make_decoder(None), num_samples=10, out_dir=out_dir,
                       latent_shape=SHAPE, num_classes=len(MUS), seed=3, batch_size=2, progress=False,
                       meta={"sampler": "sde"})
    if rank == 0 and res["npz"]:
        with open(os.path.join(out_dir, "OK"), "w") as f:
            f.write("ok")
    torch.distributed.destroy_process_group()


def test_two_process_gloo_job_matches_single_process(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "mp")), nprocs=2, join=True)
    assert (tmp_path / "mp" / "OK").exists()
    single, _ = _job(tmp_path / "single", batch=4)
    npz = tmp_path / "mp" / "samples_10x8x8x3.npz"
    assert np.array_equal(read_npz_images(str(npz)), read_npz_images(single[0]["npz"]))
