"""MAE -> DiT/SiT/classifier transfer: exact key accounting, copies, resampling, errors."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from usp_scale.models import create_model
from usp_scale.fileio import save_safetensors
from usp_scale.transfer import TransferError, load_pretrained, load_weights, read_state_dict, transfer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    """A tiny 'pretrained' MAE: a few optimizer steps so the weights are not at init."""
    torch.manual_seed(0)
    mae = create_model("vit_tiny_patch_vae", norm_pix_loss=True, kernels="torch")
    opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        loss, _, _ = mae(torch.randn(4, 4, 28, 28))
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-1599.pth"
    torch.save({"model": mae.state_dict(), "optimizer": opt.state_dict(), "epoch": 1599, "args": None}, path)
    return str(path), mae


def test_pretrain_transfer_dit_round_trip(mae_ckpt):
    path, mae = mae_ckpt
    dit = create_model("DiT-tiny/2-VAE-simple", input_size=32)
    report = transfer(dit, path)
    src = mae.state_dict()
    dst = dit.state_dict()
    for i in range(2):
        for k in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.bias", "norm2.weight",
                  "mlp.fc1.weight", "mlp.fc2.bias"):
            assert torch.equal(dst[f"blocks.{i}.{k}"], src[f"blocks.{i}.{k}"])
    assert torch.equal(dst["x_embedder.proj.weight"], src["patch_embed.proj.weight"])
    # the 14x14 table (cls row dropped) resampled bicubically to 16x16, exactly as F.interpolate does
    grid = src["pos_embed"][:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 256, -1)
    assert torch.equal(dst["pos_embed"], ref)
    assert not dit.pos_embed.requires_grad
    assert "pos_embed" in report.resampled and "cls_token" in report.dropped and "norm.weight" in report.dropped
    assert set(report.new) == {k for k in dst if k.startswith(("t_embedder", "y_embedder", "final_layer"))
                               or "adaLN" in k}
    assert set(report.copied) | set(report.resampled) | set(report.new) == set(dst)
    # adaLN-Zero: at step 0 the transferred DiT still outputs exactly 0, and a forward/backward runs
    out = dit(torch.randn(2, 4, 32, 32), torch.tensor([1, 999]), torch.tensor([0, 3]))
    assert out.shape == (2, 8, 32, 32) and torch.count_nonzero(out) == 0
    out.sum().backward()


def test_same_grid_copies_table_without_resampling(mae_ckpt):
    path, mae = mae_ckpt
    sit = create_model("SiT-tiny/2-VAE-simple", input_size=28)
    report = transfer(sit, path)
    assert not report.resampled
    assert torch.equal(sit.pos_embed, mae.pos_embed[:, 1:])


def test_plain_dit_drops_layernorms_and_use_pretrain_layer(mae_ckpt):
    path, mae = mae_ckpt
    dit = create_model("DiT-tiny/2", input_size=28)
    init_block1 = {k: v.clone() for k, v in dit.state_dict().items() if k.startswith("blocks.1.")}
    report = transfer(dit, path, use_pretrain_layer=1)
    assert "blocks.0.norm1.weight" in report.dropped and "blocks.1.attn.qkv.weight" in report.dropped
    assert torch.equal(dit.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    for k, v in init_block1.items():
        assert torch.equal(dit.state_dict()[k], v)


def test_classifier_transfer(mae_ckpt):
    path, mae = mae_ckpt
    vit = create_model("vit_tiny_patch16_vae", num_classes=10)
    report = transfer(vit, path)
    assert set(report.new) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert torch.equal(vit.pos_embed, mae.pos_embed) and torch.equal(vit.cls_token, mae.cls_token)
    probe = create_model("vit_tiny_patch16_vae", num_classes=10, global_pool="token", linprobe=True)
    transfer(probe, path)
    assert torch.equal(probe.norm.weight, mae.norm.weight)
    # features of the probe = the MAE encoder's cls token after its final norm, with nothing masked
    probe.eval()
    x = torch.randn(2, 4, 28, 28)
    feats = probe.forward_head(probe.forward_features(x), pre_logits=True)
    enc, _, _ = mae.forward_encoder(x, mask_ratio=0.0, noise=torch.arange(196.).repeat(2, 1))
    torch.testing.assert_close(feats, enc[:, 0], rtol=1e-5, atol=1e-5)


def test_mismatches_are_errors_with_keys(mae_ckpt, tmp_path):
    path, _ = mae_ckpt
    with pytest.raises(TransferError, match="width differs"):
        transfer(create_model("DiT-S/2", input_size=8), path)
    with pytest.raises(TransferError, match=r"in-channels / patch size differ.*skip-patch-embed"):
        transfer(create_model("DiT-tiny/2", in_channels=16), path)
    report = transfer(create_model("DiT-tiny/2", in_channels=16), path, skip_patch_embed=True)
    assert "x_embedder.proj.weight" in report.new and report.notes
    from usp_scale.models import DiT

    with pytest.raises(TransferError, match="has 2 blocks but 3"):
        transfer(DiT(input_size=8, hidden_size=128, depth=3, num_heads=4, vae_simple=True), path)
    with pytest.raises(TransferError, match="in-channels / patch size differ"):
        transfer(create_model("DiT-tiny/2", input_size=32).__class__(input_size=32, patch_size=4, hidden_size=128,
                                                                    depth=2, num_heads=4), path)
    # a pixel-space MAE (3 channels, patch 16) is refused, naming the key and both shapes
    pix = create_model("vit_tiny_patch_vae", img_size=224, in_chans=3).__class__(
        img_size=224, patch_size=16, in_chans=3, embed_dim=128, depth=2, num_heads=4, decoder_embed_dim=64,
        decoder_depth=1, decoder_num_heads=2)
    pix_path = tmp_path / "pixel_mae.pth"
    torch.save({"model": pix.state_dict()}, pix_path)
    with pytest.raises(TransferError, match=r"\(128, 3, 16, 16\).*\(128, 4, 2, 2\)"):
        transfer(create_model("DiT-tiny/2", input_size=32), str(pix_path))
    sd = read_state_dict(path)
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(TransferError, match="keys with no place in DiT.*blocks.0.extra.weight"):
        transfer(create_model("DiT-tiny/2-VAE-simple"), sd)
    with pytest.raises(TransferError, match="not a masked-autoencoder"):
        transfer(create_model("DiT-tiny/2"), {"foo": torch.zeros(1)})


def test_checkpoint_formats_load_strictly(tmp_path):
    torch.manual_seed(0)
    dit = create_model("DiT-tiny/2")
    ema = create_model("DiT-tiny/2")
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    official = tmp_path / "0400000.pt"
    torch.save({"model": dit.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": None}, official)
    m = create_model("DiT-tiny/2")
    load_weights(m, str(official))  # EMA by default
    assert torch.equal(m.final_layer.linear.bias, ema.final_layer.linear.bias)
    load_weights(m, str(official), which="model")
    assert torch.equal(m.final_layer.linear.bias, dit.final_layer.linear.bias)
    bare = tmp_path / "bare.pth"
    torch.save({"module." + k: v for k, v in dit.state_dict().items()}, bare)  # DDP prefix stripped
    load_weights(create_model("DiT-tiny/2"), str(bare))
    st = save_safetensors(dit, str(tmp_path / "m.safetensors"))
    load_weights(create_model("DiT-tiny/2"), st)
    with pytest.raises(ValueError, match=r"missing \(8\): blocks\.0\.norm1\.bias"):
        load_weights(create_model("DiT-tiny/2-VAE-simple"), st)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        read_state_dict(str(tmp_path / "nope.pt"))


def test_load_pretrained_dispatches(mae_ckpt, tmp_path):
    path, _ = mae_ckpt
    dit = create_model("DiT-tiny/2-VAE-simple", input_size=32)
    assert load_pretrained(dit, path) is not None  # an MAE: transferred
    export = save_safetensors(dit, str(tmp_path / "dit.safetensors"))
    again = create_model("DiT-tiny/2-VAE-simple", input_size=32)
    assert load_pretrained(again, export) is None  # its own architecture: strict load
    assert torch.equal(again.pos_embed, dit.pos_embed)


def test_transfer_launcher(mae_ckpt, tmp_path):
    path, _ = mae_ckpt
    out = tmp_path / "dit.safetensors"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "transfer.py"), "--src", path, "--model",
                        "DiT-tiny/2-VAE-simple", "--input-size", "32", "--num-classes", "10", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resampled pos_embed: 14x14 -> 16x16" in r.stdout and out.exists()
    assert os.path.exists(str(out) + ".report.json")
    m = create_model("DiT-tiny/2-VAE-simple", input_size=32)
    load_weights(m, str(out))


def test_one_state_dict_diff_for_resume_and_loading():
    """Resume (signatures: name -> shape list) and weight loading (tensors) report differences the same way."""
    from usp_scale.checkpoint.diff import diff_shapes
    from usp_scale.checkpoint.manager import diff_signature

    saved = {"a": [2, 3], "b": [4], "gone": [1]}
    model = {"a": torch.zeros(2, 3), "b": torch.zeros(5), "new": torch.zeros(1)}
    lines = diff_shapes(saved, model)
    assert lines == ["missing (1): new", "unexpected (1): gone", "shape of b: checkpoint (4,) vs model (5,)"]
    assert diff_signature(saved, {k: list(v.shape) for k, v in model.items()}) == ["  " + ln for ln in lines]
    assert diff_shapes(model, model) == []
    many = diff_shapes({}, {f"k{i:02d}": [1] for i in range(12)}, limit=3)
    assert many == ["missing (12): k00, k01, k02 ..."]


@pytest.mark.parametrize("name", ["SiT-tiny/2-VAE-simple-REPA", "DiT-tiny/2-VAE-simple-REPA", "SiT-tiny/2-REPA"])
def test_mae_into_repa_models_projectors_fresh(mae_ckpt, name):
    """USP + REPA: the transformer comes from the MAE as for the model without projector (same copies, same
    resampling); REPA's projector is the only addition, listed as initialised fresh, at REPA's init."""
    path, mae = mae_ckpt
    torch.manual_seed(0)
    repa = create_model(name, input_size=32)
    plain_name = name.replace("-REPA", "") if "VAE-simple" in name else "SiT-tiny/2"
    plain = create_model(plain_name, input_size=32, **({"learn_sigma": False} if name == "SiT-tiny/2-REPA" else {}))
    rep, ref = transfer(repa, path), transfer(plain, path)
    proj = {k for k in repa.state_dict() if k.startswith("projectors.")}
    assert proj and set(rep.new) == set(ref.new) | proj
    assert rep.copied == ref.copied and rep.resampled == ref.resampled and rep.dropped == ref.dropped
    assert list(rep.fresh) == ["projectors.*"] and "initialised fresh" in rep.fresh["projectors.*"]
    assert "initialised fresh projectors.*" in rep.summary() and '"fresh"' in rep.to_json()
    sd, own = repa.state_dict(), plain.state_dict()
    for k in ref.copied:
        assert torch.equal(sd[k], own[k]), k
    assert all(torch.count_nonzero(sd[k]) == 0 for k in proj if k.endswith(".bias"))
    w = sd["projectors.0.0.weight"]     # xavier-uniform: |w| <= sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= (6 / sum(w.shape)) ** 0.5 and w.std() > 0


def test_transfer_launcher_into_a_repa_model(mae_ckpt, tmp_path):
    path, _ = mae_ckpt
    out = tmp_path / "sit_repa.safetensors"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "transfer.py"), "--src", path, "--model",
                        "SiT-tiny/2-VAE-simple-REPA", "--input-size", "32", "--num-classes", "10", "--out", str(out),
                        "repa.encoder_depth=2", "repa.projector_dim=32", "repa.teacher=dinov2_tiny_test"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "initialised fresh projectors.*: REPA projector after block 2" in r.stdout
    m = create_model("SiT-tiny/2-VAE-simple-REPA", input_size=32, encoder_depth=2, projector_dim=32, z_dims=(64,))
    load_weights(m, str(out))
