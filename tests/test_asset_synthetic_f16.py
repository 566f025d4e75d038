"""The shipped x16 VAE `synthetic-f16` (VA-VAE's block layout at a small width, 32 latent channels), checked on
images it never saw (a fresh val split of the synthetic dataset), so a wrong, random or stale weight file fails."""
import pytest
import torch


@pytest.fixture(scope="module")
def val_images(tmp_path_factory):
    from usp_scale.data.synthetic import load_split, make_synthetic

    root = str(tmp_path_factory.mktemp("syn"))
    make_synthetic(root, classes=10, per_class=1, size=64, val_per_class=3, seed=0)
    return load_split(root, "val")


def test_synthetic_f16_has_the_vavae_layout_and_reconstructs_unseen_images(val_images):
    from usp_scale import assets
    from usp_scale.vae import FrozenVAE
    from usp_scale.vae.ldm import diffusers_to_ldm, ldm_layout
    from usp_scale.vae.named import shipped, shipped_scale

    x, _ = val_images
    assert "synthetic-f16" in shipped()
    meta = assets.read_meta("vae", "synthetic-f16")
    assert meta["args"]["layout"] == "vavae" and meta["downsample"] == 16 and meta["latent_channels"] == 32
    vae = FrozenVAE(path="synthetic-f16", version="f16d32")
    cfg = vae.model.config
    assert cfg.down_block_types[-1] == "AttnDownEncoderBlock2D" and cfg.up_block_types[0] == "AttnUpDecoderBlock2D"
    assert vae.scale == shipped_scale("synthetic-f16") == meta["scaling_factor"]
    assert vae.downsample == 16 and vae.latent_channels == 32
    # its LDM form is VA-VAE's layout: attention at the lowest level of encoder and decoder
    keys = {k: cfg[k] for k in ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block")}
    ldm = diffusers_to_ldm(vae.model.state_dict(), keys)
    assert "encoder.down.4.attn.0.q.weight" in ldm and "decoder.up.4.attn.1.q.weight" in ldm
    assert ldm_layout(ldm)["up_block_types"] == tuple(cfg.up_block_types)
    xi = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = vae.encode(xi)
    assert z.shape == (30, 32, 4, 4)
    assert 0.7 < float(z.std()) < 1.4          # 1 / std of the train latents: unit scale on unseen images too
    rec = ((vae.decode(z) + 1) * 127.5).round()
    mse = (rec - torch.from_numpy(x).permute(0, 3, 1, 2).float()).pow(2).flatten(1).mean(1)
    psnr = (10 * torch.log10(255.0 ** 2 / mse)).mean().item()
    assert psnr > meta["val_psnr_db"] - 2.5 and psnr > 22.0, psnr    # a random VAE gives ~10 dB
