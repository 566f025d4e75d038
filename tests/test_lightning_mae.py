"""LightningMAE (USP's masked autoencoder with LightningDiT encoder blocks) against the readable reference of
tests/_helpers_lightning.py, and its transfer into LightningDiT: exact (a transferred block with the identity
modulation computes the MAE's block bit for bit), every transformer key copied, what is fresh listed, mismatches
refused naming the keys."""
import copy

import pytest
import torch

from _helpers_lightning import ref_mae
from usp_scale.models import create_model
from usp_scale.models.lightning_mae import LightningMAE
from usp_scale.models.lightningdit import LightningDiT
from usp_scale.transfer import TransferError, transfer
from usp_scale.transfer.core import load_pretrained


def _perturb(m, seed=0, scale=0.05):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return m


def _awkward_mae(**kw):
    """Width 100, 5 heads (RoPE head dim 20), patch 2 on 12 x 12 latents of 6 channels (36 tokens), a 40-wide
    decoder of 2 heads."""
    return _perturb(LightningMAE(img_size=12, patch_size=2, in_chans=6, embed_dim=100, depth=2, num_heads=5,
                                 decoder_embed_dim=40, decoder_depth=1, decoder_num_heads=2, **kw))


@pytest.mark.parametrize("kw,ratio", [({}, 0.75), ({"norm_pix_loss": True, "use_qknorm": True}, 0.5)])
def test_mae_loss_prediction_and_gradients_equal_the_reference(kw, ratio):
    m = _awkward_mae(**kw)
    exact = copy.deepcopy(m).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 12, 12, generator=g)
    noise = torch.rand(3, 36, generator=g)
    loss, pred, mask = m(x, mask_ratio=ratio, noise=noise)
    rloss, rpred, rmask = ref_mae(exact, x.double(), noise, ratio)
    assert torch.equal(mask, rmask.float()) and int(mask.sum()) == 3 * (36 - int(36 * (1 - ratio)))
    torch.testing.assert_close(pred, rpred.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, rloss.float(), atol=1e-6, rtol=1e-5)
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    g_out = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    g_ref = torch.autograd.grad(rloss, [dict(exact.named_parameters())[n] for n, _ in named], allow_unused=True)
    for (n, _), a, b in zip(named, g_out, g_ref):
        assert (a is None) == (b is None), n
        if a is not None:
            torch.testing.assert_close(a, b.float(), atol=1e-6 * (1 + b.abs().max().item()), rtol=1e-4, msg=n)


def test_registry_mae_sizes_match_lightningdit():
    for size in ("B", "L", "XL", "1p0B"):
        mae = create_model(f"LightningMAE-{size}/1", device="meta")
        dit = create_model(f"LightningDiT-{size}/1", device="meta")
        shared = {k: v.shape for k, v in mae.state_dict().items() if k.startswith("blocks.")}
        own = {k: v.shape for k, v in dit.state_dict().items() if k.startswith("blocks.") and "adaLN" not in k}
        assert shared == own, size
    mae = create_model("LightningMAE-XL/1", device="meta")
    assert (mae.num_patches, mae.in_chans, mae.decoder_embed_dim, len(mae.decoder_blocks)) == (256, 32, 512, 8)


def test_transfer_copies_every_transformer_key_and_is_exact(tmp_path):
    mae = _perturb(create_model("LightningMAE-tiny/1"))
    torch.save({"model": mae.state_dict(), "epoch": 3}, tmp_path / "checkpoint-3.pth")   # USP's pretraining format
    dit = create_model("LightningDiT-tiny/1")
    report = load_pretrained(dit, str(tmp_path / "checkpoint-3.pth"))
    own, src = dit.state_dict(), mae.state_dict()
    transformer = [k for k in own if k.startswith("blocks.") and ".adaLN_modulation." not in k]
    assert set(report.copied) == set(transformer) | {"x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed"}
    assert all(torch.equal(own[k], src[k]) for k in transformer)
    assert torch.equal(own["x_embedder.proj.weight"], src["patch_embed.proj.weight"])
    assert set(report.new) == {k for k in own if k.startswith(("t_embedder.", "y_embedder.", "final_layer.",
                                                                "feat_rope.")) or ".adaLN_modulation." in k}
    assert set(report.dropped) == {k for k in src if k.startswith(("decoder_", "feat_rope.")) or
                                   k in ("mask_token", "norm.weight")}
    assert not report.resampled and any("feat_rope" in n for n in report.notes)
    assert all(own[k].abs().sum() == 0 for k in own if ".adaLN_modulation." in k or k.startswith("final_layer.l"))
    # exactness: with the identity modulation (shift 0, scale 0, gate 1) every transferred block is the MAE's
    with torch.no_grad():
        for blk in dit.blocks:
            blk.adaLN_modulation[-1].bias.copy_(torch.cat([torch.zeros(128), torch.zeros(128), torch.ones(128)] * 2))
        x = torch.randn(2, 16, 128)
        c = torch.randn(2, 128)
        rope = dit.feat_rope.tables()
        a, b = x, x
        for mb, db in zip(mae.blocks, dit.blocks):
            a, b = mb(a, None, rope), db(b, c, rope)
            assert torch.equal(a, b)


def test_transfer_from_another_grid_resamples_the_position_table():
    mae = _perturb(create_model("LightningMAE-tiny/1", img_size=14))      # USP pretrains at 224 px: 14 x 14
    dit = create_model("LightningDiT-tiny/1", input_size=16)
    report = transfer(dit, mae.state_dict())
    assert report.resampled == {"pos_embed": "14x14 -> 16x16 bicubic"}
    assert torch.equal(dit.feat_rope.freqs_cos, create_model("LightningDiT-tiny/1", input_size=16).feat_rope.freqs_cos)


def test_mismatched_transfers_are_refused_naming_the_keys():
    mae = create_model("LightningMAE-tiny/1").state_dict()
    wide = LightningDiT(input_size=4, patch_size=1, in_channels=32, hidden_size=192, depth=2, num_heads=4,
                        num_classes=10)
    with pytest.raises(TransferError, match=r"width differs: checkpoint patch_embed\.proj\.weight \(128, 32, 1, 1\) "
                                            r"vs model x_embedder\.proj\.weight \(192, 32, 1, 1\)"):
        transfer(wide, mae)
    with pytest.raises(TransferError, match=r"(?s)keys with no place in .*blocks\.0\.attn\.k_norm\.weight"):
        transfer(create_model("LightningDiT-tiny/1"), create_model("LightningMAE-tiny/1", use_qknorm=True).state_dict())
    with pytest.raises(TransferError, match=r"not provided \['blocks\.0\.attn\.k_norm\.weight'"):
        transfer(create_model("LightningDiT-tiny/1", use_qknorm=True), mae)
    with pytest.raises(TransferError, match=r"is a USP ViT MAE \(it has cls_token"):
        transfer(create_model("LightningDiT-tiny/1"), create_model("vit_tiny_patch_vae").state_dict())
    with pytest.raises(TransferError, match=r"is a LightningMAE .* not into DiT"):
        transfer(create_model("DiT-tiny/2-VAE-simple"), mae)
    with pytest.raises(TransferError, match=r"is a LightningMAE .* not into VisionTransformer"):
        transfer(create_model("vit_tiny_patch16_vae"), mae)
