"""Frozen VAE: tiny-random shapes/determinism/scale, loading from a diffusers folder, single files
(diffusers and original LDM/MAR key layouts), error texts."""
import re

import pytest
import torch

from usp_scale.vae import SCALE, FrozenVAE, VAELoadError


def _imgs(n=2, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, s, s, generator=g) * 2 - 1


@pytest.mark.parametrize("version,shape", [("d8", (2, 4, 4, 4)), ("d16", (2, 16, 2, 2))])
def test_tiny_random_shapes_scale_and_determinism(version, shape):
    a, b = FrozenVAE(version=version), FrozenVAE(version=version)
    x = _imgs()
    za = a.encode(x)
    assert za.shape == shape and za.dtype == torch.float32
    assert a.scale == SCALE[version] and a.latent_shape(32) == shape[1:]
    assert a.fingerprint == b.fingerprint and torch.equal(za, b.encode(x))
    assert FrozenVAE(version=version, seed=1).fingerprint != a.fingerprint
    mean, logvar = a.encode_moments(x)
    torch.testing.assert_close(za, mean * SCALE[version])
    assert torch.equal(FrozenVAE(version=version, scale=1.0).encode(x), mean)
    y = a.decode(za)
    assert y.shape == (2, 3, 32, 32) and y.min() >= -1 and y.max() <= 1


def test_posterior_sample_is_seeded_and_distributed_like_the_posterior():
    vae = FrozenVAE(posterior="sample")
    x = _imgs(4)
    mean, logvar = vae.encode_moments(x)
    s1 = vae.encode(x, generator=torch.Generator().manual_seed(5))
    s2 = vae.encode(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2) and not torch.equal(s1, vae.encode(x, posterior="mean"))
    eps = (s1 / vae.scale - mean) / torch.exp(0.5 * logvar.clamp(-30, 20))
    assert abs(eps.mean().item()) < 0.2 and 0.8 < eps.std().item() < 1.2


def test_frozen_eval_no_grad_and_precisions():
    vae = FrozenVAE(dtype="bf16", channels_last=True)
    assert not vae.model.training and not any(p.requires_grad for p in vae.model.parameters())
    assert not isinstance(vae, torch.nn.Module)  # can never be wrapped by an engine or optimiser
    x = _imgs().requires_grad_(True)
    z = vae.encode(x)
    assert not z.requires_grad and z.dtype == torch.float32
    ref = FrozenVAE().encode(x.detach())
    assert (z - ref).abs().max() < 0.1 * ref.abs().max()  # bf16 is close to fp32
    with pytest.raises(RuntimeError, match="frozen"):
        vae.train()
    with pytest.raises(VAELoadError, match="vae.dtype='fp8'"):
        FrozenVAE(dtype="fp8")


def test_load_from_diffusers_folder_and_single_safetensors(tmp_path):
    from safetensors.torch import save_file
    ref = FrozenVAE(seed=4)
    ref.model.save_pretrained(tmp_path / "vae_folder")
    x = _imgs()
    folder = FrozenVAE(path=str(tmp_path / "vae_folder"))
    assert folder.fingerprint == ref.fingerprint and torch.equal(folder.encode(x), ref.encode(x))
    sd = {"first_stage_model." + k: v.contiguous() for k, v in ref.model.state_dict().items()}  # SD-checkpoint style prefix
    save_file(sd, str(tmp_path / "vae.safetensors"))
    single = FrozenVAE(path=str(tmp_path / "vae.safetensors"))
    assert single.fingerprint == ref.fingerprint
    torch.testing.assert_close(single.decode(single.encode(x)), ref.decode(ref.encode(x)))
    assert single.identity()["name"] == "vae.safetensors"


def _to_ldm(sd, n_blocks):
    """diffusers AutoencoderKL keys -> original LDM/MAR keys (test-side inverse of the loader's conversion)."""
    out = {}
    for k, v in sd.items():
        k2 = k
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(.*)", k2)
        if m:
            k2 = f"decoder.up.{n_blocks - 1 - int(m.group(1))}.{m.group(2)}"
        m = re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.attentions\.(\d+)\.(.*)", k2.replace("down_blocks", "down"))
        k2 = k2.replace("down_blocks", "down")
        k2 = re.sub(r"\.resnets\.(\d+)\.", r".block.\1.", k2) if ".mid_block." not in k2 else k2
        k2 = k2.replace("downsamplers.0.conv", "downsample.conv").replace("upsamplers.0.conv", "upsample.conv")
        k2 = k2.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        k2 = k2.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        k2 = k2.replace("mid_block.attentions.0.", "mid.attn_1.")
        k2 = re.sub(r"\.attentions\.(\d+)\.", r".attn.\1.", k2)
        for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            if f".{a}." in k2:
                k2 = k2.replace(f".{a}.", f".{b}.")
                if a != "group_norm" and k2.endswith("weight"):
                    v = v[:, :, None, None]  # linear -> 1x1 conv
        out[k2] = v
    return out


@pytest.mark.parametrize("version,n_blocks", [("d8", 4), ("d16", 5)])
def test_load_original_ldm_layout_checkpoint(tmp_path, version, n_blocks):
    ref = FrozenVAE(version=version, seed=2)
    ldm = _to_ldm(ref.model.state_dict(), n_blocks)
    assert any(k.startswith("encoder.down.0.block.0.") for k in ldm)
    if version == "d16":
        assert "encoder.down.4.attn.0.q.weight" in ldm  # KL-16 keeps attention at its lowest level
    torch.save({"model": ldm}, tmp_path / "kl.ckpt")  # MAR's kl16.ckpt layout
    got = FrozenVAE(path=str(tmp_path / "kl.ckpt"), version=version)
    x = _imgs()
    torch.testing.assert_close(got.encode(x), ref.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.decode(ref.encode(x)), ref.decode(ref.encode(x)), atol=1e-5, rtol=1e-5)


def test_wrong_paths_say_what_to_put_where(tmp_path):
    with pytest.raises(VAELoadError, match=r"VAE path not found: .*nope.*config.json and "
                                           r"diffusion_pytorch_model.safetensors.*sd-vae-ft-ema"):
        FrozenVAE(path=str(tmp_path / "nope"))
    # a mistyped short name: the message lists the shipped VAEs and the launcher that re-makes them
    with pytest.raises(VAELoadError, match=r"shapes-f9.*\(shapes-f8, synthetic-f16, synthetic-f8: .*train_vae.py"):
        FrozenVAE(path="shapes-f9")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAELoadError, match=r"empty has no config.json"):
        FrozenVAE(path=str(tmp_path / "empty"))
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "config.json").write_text("{}")
    with pytest.raises(VAELoadError, match=r"no diffusion_pytorch_model.safetensors"):
        FrozenVAE(path=str(tmp_path / "cfgonly"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "x.ckpt")
    with pytest.raises(VAELoadError, match=r"x.ckpt holds no VAE weights"):
        FrozenVAE(path=str(tmp_path / "x.ckpt"))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(VAELoadError, match=r"not a .safetensors/.ckpt"):
        FrozenVAE(path=str(tmp_path / "w.txt"))
    with pytest.raises(VAELoadError, match="vae.version='d32'"):
        FrozenVAE(version="d32")


def test_single_file_with_the_old_attention_names_loads_as_the_folder_does(tmp_path):
    """diffusers < 0.14 named the attention layers query/key/value/proj_attn; diffusers renames them when it loads a
    folder, and our single-file loader renames them the same way (both give the reference weights)."""
    from safetensors.torch import save_file

    ref = FrozenVAE(version="d8", seed=3)
    old = {}
    for k, v in ref.model.state_dict().items():
        for new, was in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{was}.")
        old[k] = v.contiguous()
    assert sum(".query." in k or ".proj_attn." in k for k in old) >= 4   # the mid blocks' attention
    save_file(old, str(tmp_path / "old.safetensors"))
    ref.model.save_pretrained(tmp_path / "folder")                       # the same weights as an old-layout folder
    save_file(old, str(tmp_path / "folder" / "diffusion_pytorch_model.safetensors"))
    x = _imgs()
    for path in (tmp_path / "folder", tmp_path / "old.safetensors"):
        vae = FrozenVAE(path=str(path))
        assert vae.fingerprint == ref.fingerprint, path
        torch.testing.assert_close(vae.decode(vae.encode(x)), ref.decode(ref.encode(x)))
