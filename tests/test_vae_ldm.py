"""LDM-layout autoencoder checkpoints (VA-VAE f16d32, SD-VAE f8) through the strict loader of FrozenVAE.

The reference is a readable LDM/CompVis autoencoder written here with LDM's own module names (Encoder/Decoder with
``down.i.block.j``, ``attn``, ``mid.block_1``...): a checkpoint written from it in the VA-VAE release format
(a ``state_dict`` with the training-only families) must load strictly, encode and decode exactly as the reference,
and convert LDM -> diffusers -> LDM without a change."""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from usp_scale.vae import FrozenVAE, VAELoadError
from usp_scale.vae.frozen import content_fingerprint
from usp_scale.vae.ldm import diffusers_to_ldm, key_table, ldm_layout, ldm_to_diffusers


# ----------------------------------------------------------------------------------------- the LDM reference
def _gn(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _gn(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _gn(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions with 1x1-conv projections, softmax(q k / sqrt(C))."""

    def __init__(self, c):
        super().__init__()
        self.norm = _gn(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)           # (b, hw, c)
        k = self.k(h).reshape(b, c, hh * ww)                           # (b, c, hw)
        v = self.v(h).reshape(b, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) / c ** 0.5, dim=2)           # (b, hw_q, hw_k)
        out = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, cin = resolution, ch
        for i, m in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResBlock(cin, ch * m))
                cin = ch * m
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != len(ch_mult) - 1:
                level.downsample = nn.Module()
                level.downsample.conv = nn.Conv2d(cin, cin, 3, stride=2)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResBlock(cin, cin), AttnBlock(cin), ResBlock(cin, cin)
        self.norm_out = _gn(cin)
        self.conv_out = nn.Conv2d(cin, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample.conv(F.pad(h, (0, 1, 0, 1)))  # asymmetric padding, stride 2
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels):
        super().__init__()
        n = len(ch_mult)
        cin, res = ch * ch_mult[-1], resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResBlock(cin, cin), AttnBlock(cin), ResBlock(cin, cin)
        levels = []
        for i in reversed(range(n)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResBlock(cin, ch * ch_mult[i]))
                cin = ch * ch_mult[i]
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != 0:
                level.upsample = nn.Module()
                level.upsample.conv = nn.Conv2d(cin, cin, 3, padding=1)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _gn(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class LDMAutoencoderKL(nn.Module):
    def __init__(self, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), resolution=256,
                 z_channels=32, embed_dim=32, decoder_attn=True):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, attn_resolutions if decoder_attn else (), resolution,
                               z_channels)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def moments(self, x):
        return self.quant_conv(self.encoder(x)).chunk(2, dim=1)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def _reference(seed=0, **kw):
    torch.manual_seed(seed)
    m = LDMAutoencoderKL(**kw).eval()
    with torch.no_grad():  # off the GroupNorm inits, so a swapped weight/bias would show
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _training_only_families(g):
    """What a VA-VAE training checkpoint carries besides the autoencoder (vavae/ldm/models/autoencoder.py):
    the LPIPSWithDiscriminator loss, the VF loss's frozen DINOv2 and its projection (reverse_proj: 32 -> 1024)."""
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {"loss.logvar": torch.zeros(()),
            "loss.perceptual_loss.net.slice1.0.weight": r(64, 3, 3, 3),
            "loss.perceptual_loss.lin0.model.1.weight": r(1, 64, 1, 1),
            "loss.perceptual_loss.scaling_layer.shift": r(1, 3, 1, 1),
            "loss.discriminator.main.0.weight": r(64, 3, 4, 4),
            "foundation_model.model.cls_token": r(1, 1, 1024),
            "foundation_model.model.pos_embed": r(1, 257, 1024),
            "foundation_model.model.blocks.0.attn.qkv.weight": r(3072, 1024),
            "linear_proj.weight": r(1024, 32, 1, 1)}


def _imgs(n=2, s=32, seed=1):
    return torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def vavae():
    return _reference(0)


@pytest.fixture(scope="module")
def vavae_file(vavae, tmp_path_factory):
    """The release format: a .pt whose "state_dict" holds LDM keys plus the training-only families."""
    path = tmp_path_factory.mktemp("vavae") / "vavae-f16d32.pt"
    sd = {k: v.clone() for k, v in vavae.state_dict().items()}
    sd.update(_training_only_families(torch.Generator().manual_seed(3)))
    torch.save({"state_dict": sd, "epoch": 125, "global_step": 1000}, path)
    return path


# ----------------------------------------------------------------------------------------- tests
def test_vavae_loads_strictly_and_encodes_decodes_as_the_ldm_reference(vavae, vavae_file, caplog):
    with caplog.at_level(logging.INFO, logger="usp_scale.vae"):
        vae = FrozenVAE(path=str(vavae_file), version="f16d32", channels_last=False)
    log = caplog.text
    for fam, n in (("loss.", 5), ("foundation_model.", 3), ("linear_proj.", 1)):
        assert f"dropped {n} tensors of {fam}*" in log, log
    cfg = vae.model.config
    assert cfg.down_block_types[-1] == "AttnDownEncoderBlock2D" and cfg.up_block_types[0] == "AttnUpDecoderBlock2D"
    assert tuple(cfg.block_out_channels) == (32, 32, 64, 64, 128) and cfg.layers_per_block == 2
    assert vae.scale == 1.0 and vae.downsample == 16 and vae.latent_shape(32) == (32, 2, 2)
    x = _imgs()
    with torch.no_grad():
        ref_mean, ref_logvar = vavae.moments(x)
        mean, logvar = vae.encode_moments(x)
        # fp32, two module trees running the same convolutions: oneDNN picks kernels (and summation orders) per CPU,
        # 2.3e-5 was seen on an AVX-512 machine; a wrong key mapping is off by O(1)
        tol = dict(atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(mean, ref_mean, **tol)
        torch.testing.assert_close(logvar, ref_logvar, **tol)
        torch.testing.assert_close(vae.encode(x), ref_mean, **tol)     # scale 1.0: the raw mean
        z = torch.randn(2, 32, 2, 2, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(vae.decode(z), vavae.decode(z).clamp(-1, 1), **tol)
        # bf16 weights: the same network within bf16's precision
        half = FrozenVAE(path=str(vavae_file), version="f16d32", dtype="bf16", channels_last=False)
        err = (half.encode(x) - ref_mean).abs().max() / ref_mean.abs().max()
        assert err < 0.05, err
    # one VAE by content: the same weights from a diffusers folder give the same fingerprint
    assert half.content_fingerprint == vae.content_fingerprint == content_fingerprint(vae.model)


def test_vavae_as_a_diffusers_folder_has_the_same_content(vavae_file, tmp_path):
    vae = FrozenVAE(path=str(vavae_file), version="f16d32")
    vae.model.save_pretrained(tmp_path / "vavae")
    folder = FrozenVAE(path=str(tmp_path / "vavae"), version="f16d32")
    assert folder.content_fingerprint == vae.content_fingerprint
    x = _imgs()
    assert torch.equal(folder.encode(x), vae.encode(x))


def test_ldm_diffusers_round_trips_both_ways(vavae):
    ldm = vavae.state_dict()
    cfg = ldm_layout(ldm)
    assert cfg["up_block_types"] == ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4
    dif, cfg2 = ldm_to_diffusers(ldm)
    assert cfg2 == cfg and len(dif) == len(ldm) == len(key_table(cfg))
    back = diffusers_to_ldm(dif, cfg)
    assert set(back) == set(ldm) and all(torch.equal(back[k], ldm[k]) for k in ldm)
    # and from the diffusers side: a diffusers AutoencoderKL of the VA-VAE layout -> LDM -> diffusers
    vae = FrozenVAE(version="f16d32", seed=3)
    own = vae.model.state_dict()
    cfg3 = {k: vae.model.config[k] for k in ("down_block_types", "up_block_types", "block_out_channels",
                                             "layers_per_block")}
    ldm3 = diffusers_to_ldm(own, cfg3)
    assert "decoder.up.4.attn.1.q.weight" in ldm3 and ldm3["decoder.up.4.attn.1.q.weight"].ndim == 4
    again, _ = ldm_to_diffusers(ldm3)
    assert set(again) == set(own) and all(torch.equal(again[k], own[k]) for k in own)


def test_missing_unexpected_and_unknown_keys_are_refused_naming_file_and_keys(vavae, tmp_path):
    base = {k: v.clone() for k, v in vavae.state_dict().items()}
    cases = {
        "extra": (dict(base, **{"encoder.down.0.block.0.extra.weight": torch.zeros(1)}),
                  r"extra\.pt.*unexpected 1 \['encoder\.down\.0\.block\.0\.extra\.weight'\]"),
        "missing": ({k: v for k, v in base.items() if k != "decoder.up.4.attn.1.q.weight"},
                    r"missing\.pt.*missing 1 \['decoder\.up\.4\.attn\.1\.q\.weight'\]"),
        "unknown": (dict(base, **{"model_ema.decay": torch.tensor(0.999)}),
                    r"unknown\.pt: 1 keys are neither the autoencoder .* training-only family .*model_ema\.decay"),
    }
    for name, (sd, pattern) in cases.items():
        torch.save({"state_dict": sd}, tmp_path / f"{name}.pt")
        with pytest.raises(VAELoadError, match=pattern):
            FrozenVAE(path=str(tmp_path / f"{name}.pt"), version="f16d32")


def test_ldm_sd_vae_file_f8_loads_through_the_same_strict_loader(tmp_path):
    """SD-VAE's original layout (kl-f8: ch_mult 1,2,4,4, no attention in the levels, 4 channels) with its loss."""
    ref = _reference(1, ch=32, ch_mult=(1, 2, 4, 4), attn_resolutions=(), z_channels=4, embed_dim=4)
    sd = dict(ref.state_dict())
    sd["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": sd}, tmp_path / "sd-vae.ckpt")
    vae = FrozenVAE(path=str(tmp_path / "sd-vae.ckpt"), version="d8", scale=1.0, channels_last=False)
    assert set(vae.model.config.down_block_types) == {"DownEncoderBlock2D"} and vae.latent_channels == 4
    x = _imgs()
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x), ref.moments(x)[0], atol=2e-5, rtol=1e-5)
        z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(vae.decode(z), ref.decode(z).clamp(-1, 1), atol=2e-5, rtol=1e-5)
