"""Every registered name builds on the meta device with the official keys and sizes."""
import re
import time

import pytest
import torch

from usp_scale.models import create_model, list_models, model_family

OFFICIAL_COUNTS = {  # parameters incl. the frozen position tables (docs/method.md §8)
    "DiT-XL/2": 675_129_632,
    "DiT-XL/2-VAE-simple": 675_258_656,
    "DiT-B/2": 130_512_416,
    "vit_xlarge_patch_vae": 472_496_272,
}


def nparams(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,count", OFFICIAL_COUNTS.items())
def test_official_parameter_counts(name, count):
    assert nparams(create_model(name, device="meta")) == count


def test_registry_names():
    names = set(list_models())
    for s in ("S", "B", "L", "XL"):
        for p in (2, 4, 8):
            assert f"DiT-{s}/{p}" in names and f"SiT-{s}/{p}" in names
    for s in ("B", "L", "XL"):
        assert f"DiT-{s}/2-VAE-simple" in names and f"SiT-{s}/2-VAE-simple" in names
    for s in ("base", "large", "xlarge"):
        assert f"vit_{s}_patch_vae" in names and f"vit_{s}_patch16_vae" in names
    assert {"vit_base_patch_vae_2", "vit_large_patch_vae_2", "vit_tiny_patch_vae"} <= names
    with pytest.raises(KeyError, match="did you mean .*DiT-XL/2"):
        create_model("DiT-XL/3")


MAE_KEY = re.compile(r"^(cls_token|pos_embed|mask_token|decoder_pos_embed|patch_embed\.proj\.(weight|bias)|"
                     r"(decoder_)?blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)|"
                     r"(decoder_)?norm\.(weight|bias)|decoder_(embed|pred)\.(weight|bias))$")
DIT_KEY = re.compile(r"^(pos_embed|x_embedder\.proj\.(weight|bias)|t_embedder\.mlp\.[02]\.(weight|bias)|"
                     r"y_embedder\.embedding_table\.weight|"
                     r"blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|adaLN_modulation\.1)\."
                     r"(weight|bias)|final_layer\.(linear|adaLN_modulation\.1)\.(weight|bias)|"
                     r"projectors\.\d+\.[024]\.(weight|bias)|blocks\.\d+\.attn\.[qk]_norm\.(weight|bias))$")
VIT_KEY = re.compile(r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|"
                     r"blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)|"
                     r"(norm|fc_norm|head)\.(weight|bias))$")


LIGHTNING_BLOCK = (r"blocks\.\d+\.(norm1\.weight|norm2\.weight|attn\.(qkv|proj)\.(weight|bias)|"
                   r"mlp\.(w12|w3)\.(weight|bias))")
LIGHTNINGDIT_KEY = re.compile(r"^(pos_embed|feat_rope\.freqs_(cos|sin)|x_embedder\.proj\.(weight|bias)|"
                              r"t_embedder\.mlp\.[02]\.(weight|bias)|y_embedder\.embedding_table\.weight|"
                              + LIGHTNING_BLOCK + r"|blocks\.\d+\.adaLN_modulation\.1\.(weight|bias)|"
                              r"final_layer\.(norm_final\.weight|(linear|adaLN_modulation\.1)\.(weight|bias)))$")
LIGHTNING_MAE_KEY = re.compile(r"^(pos_embed|mask_token|decoder_pos_embed|feat_rope\.freqs_(cos|sin)|"
                               r"patch_embed\.proj\.(weight|bias)|" + LIGHTNING_BLOCK + r"|norm\.weight|"
                               r"decoder_blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\."
                               r"(weight|bias)|decoder_(norm|embed|pred)\.(weight|bias))$")


@pytest.mark.parametrize("name", list_models())
def test_key_layout_on_meta(name):
    start = time.time()
    m = create_model(name, device="meta")
    keys = list(m.state_dict())
    pattern = {"mae": MAE_KEY, "dit": DIT_KEY, "sit": DIT_KEY, "vit": VIT_KEY,
               "lightningdit": LIGHTNINGDIT_KEY}[model_family(name)]
    if name.startswith("LightningMAE-"):
        pattern = LIGHTNING_MAE_KEY
    bad = [k for k in keys if not pattern.match(k)]
    assert not bad, bad
    assert all(p.device.type == "meta" for p in m.parameters())
    assert time.time() - start < 20
    if model_family(name) in ("dit", "sit"):
        has_affine = "blocks.0.norm1.weight" in keys
        assert has_affine == ("-VAE-simple" in name)
        assert m.y_embedder.embedding_table.weight.shape[0] == m.y_embedder.num_classes + 1
        p = int(name.split("/")[1].split("-")[0])
        assert m.x_embedder.proj.kernel_size == (p, p)
        repa_sit = name.endswith("/2-REPA")          # REPA's SiT: no learned sigma
        assert m.final_layer.linear.out_features == p * p * (4 if repa_sit else 8)
        assert any(k.startswith("projectors.") for k in keys) == name.endswith("-REPA")


def test_xl_shapes():
    m = create_model("vit_xlarge_patch_vae", device="meta")
    sd = m.state_dict()
    assert sd["pos_embed"].shape == (1, 197, 1152) and sd["decoder_pos_embed"].shape == (1, 197, 512)
    assert sd["patch_embed.proj.weight"].shape == (1152, 4, 2, 2) and sd["decoder_pred.weight"].shape == (16, 512)
    assert len(m.blocks) == 28 and len(m.decoder_blocks) == 8 and m.blocks[0].attn.head_dim == 72
    d = create_model("DiT-XL/2-VAE-simple", device="meta")
    assert d.state_dict()["pos_embed"].shape == (1, 256, 1152)


def test_flops_match_performance_anchors():
    # docs/anchors.md A3: DiT-XL/2 118.4 GMAC forward, MAE-XL 27.7 GMAC
    dit = create_model("DiT-XL/2", device="meta").flops_per_sample() / 2e9
    mae = create_model("vit_xlarge_patch_vae", device="meta").flops_per_sample() / 2e9
    assert abs(dit - 118.6) / 118.6 < 0.01, dit
    assert abs(mae - 27.7) / 27.7 < 0.03, mae
