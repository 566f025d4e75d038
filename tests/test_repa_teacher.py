"""REPA's teacher (usp_scale/models/teacher.py, usp_scale/transfer/teachers.py): DINOv2 ViT-B/14 against a readable
reference written here and against timm's own ViT (the real thing, installed); the official torch.hub checkpoint
format (key names as facebookresearch/dinov2's vit_base builds them) and timm's, written here from seeded random
weights; REPA's preprocessing for 256 and 512 px; the frozen wrapper; the refusals."""
import os
import importlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from usp_scale.models.teacher import (DINOv2ViT, FrozenTeacher, TeacherSpec, check_token_count, raw_from_unit_range,
                                      repa_input_size, repa_preprocess)
from usp_scale.transfer.teachers import (HUB_URL, TeacherWeightsError, expected_keys, hub_to_timm, load_teacher,
                                         timm_to_hub)

A = importlib.import_module("usp_scale.layers.attention")
TINY = TeacherSpec(embed_dim=36, depth=2, num_heads=4, patch_size=14)

# The hub checkpoint's keys, in its order: dinov2 vision_transformer.DinoVisionTransformer (cls_token, pos_embed,
# mask_token; patch_embed.proj; blocks.i = NestedTensorBlock(norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
# mlp.fc1, mlp.fc2, ls2.gamma) with block_chunks=0; norm; head = Identity) for vit_base (768 wide, 12 deep,
# init_values 1.0 -> LayerScale), img_size 518 -> 37 x 37 patches.
BLOCK = [("norm1.weight", (768,)), ("norm1.bias", (768,)), ("attn.qkv.weight", (2304, 768)),
         ("attn.qkv.bias", (2304,)), ("attn.proj.weight", (768, 768)), ("attn.proj.bias", (768,)),
         ("ls1.gamma", (768,)), ("norm2.weight", (768,)), ("norm2.bias", (768,)), ("mlp.fc1.weight", (3072, 768)),
         ("mlp.fc1.bias", (3072,)), ("mlp.fc2.weight", (768, 3072)), ("mlp.fc2.bias", (768,)), ("ls2.gamma", (768,))]
HUB_KEYS = ([("cls_token", (1, 1, 768)), ("pos_embed", (1, 1370, 768)), ("mask_token", (1, 768)),
             ("patch_embed.proj.weight", (768, 3, 14, 14)), ("patch_embed.proj.bias", (768,))]
            + [(f"blocks.{i}.{k}", s) for i in range(12) for k, s in BLOCK]
            + [("norm.weight", (768,)), ("norm.bias", (768,))])


@pytest.fixture
def reference_attention():
    """Sets the explicit reference attention on a model's attention modules; returns the model."""
    def use(model):
        assert A.set_attention_backend(model, "reference") > 0
        return model
    return use


def reference_dinov2(sd, x, heads, patch):
    """DINOv2's forward_features(x)["x_norm_patchtokens"] from a state dict (no registers, LayerScale)."""
    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    h = torch.cat([sd["cls_token"].expand(len(h), -1, -1), h], dim=1) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    N, T, D = h.shape
    d = D // heads
    for i in range(depth):
        p = f"blocks.{i}."
        a = F.layer_norm(h, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        q, k, v = F.linear(a, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(N, T, 3, heads, d) \
            .permute(2, 0, 3, 1, 4)
        o = (torch.softmax(q @ k.transpose(-2, -1) * d ** -0.5, dim=-1) @ v).transpose(1, 2).reshape(N, T, D)
        h = h + sd[p + "ls1.gamma"] * F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        m = F.layer_norm(h, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        m = F.linear(F.gelu(F.linear(m, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        h = h + sd[p + "ls2.gamma"] * m
    return F.layer_norm(h, (D,), sd["norm.weight"], sd["norm.bias"], 1e-6)[:, 1:]


def _randomise(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            base = 1.0 if n.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * (0.05 if p.ndim > 1 else 0.2))
    return net


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("grid", [2, 3])
def test_teacher_equals_the_reference_and_timm(grid, dtype, tol, reference_attention):
    from timm.models.vision_transformer import VisionTransformer

    net = reference_attention(_randomise(DINOv2ViT(TINY, grid=grid)).eval())
    x = torch.randn(3, 3, grid * 14, grid * 14, generator=torch.Generator().manual_seed(1))
    sd = net.state_dict()
    tm = VisionTransformer(img_size=grid * 14, patch_size=14, embed_dim=36, depth=2, num_heads=4, init_values=1e-5,
                           num_classes=0).eval()
    tm.load_state_dict(sd, strict=True)           # our keys are timm's
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = net(x)
        ref = reference_dinov2(sd, x, 4, 14)
        tim = tm.forward_features(x)[:, 1:]
    assert out.shape == (3, grid * grid, 36)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), tim.float(), atol=tol, rtol=tol)


def test_flops_per_image(reference_attention):
    net = reference_attention(DINOv2ViT(TINY, grid=3).eval())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.randn(1, 3, 42, 42))
    assert counter.get_total_flops() == pytest.approx(net.flops_per_image(), rel=1e-9)
    with torch.device("meta"):
        b14 = DINOv2ViT(expected_spec(), grid=16)
    assert 46e9 < b14.flops_per_image() < 47e9      # DINOv2-B at 224 px: ~46.3 GFLOP (issue 20: "about 47")


def expected_spec():
    from usp_scale.models.teacher import TEACHERS
    return TEACHERS["dinov2_vitb14"]


# ------------------------------------------------------------------------------------------- files
def _hub_state(seed=0):
    """A seeded random ViT-B/14 in the hub checkpoint's exact layout (keys, order, shapes, mask_token)."""
    net = _randomise(DINOv2ViT(expected_spec(), grid=37), seed)
    sd = net.state_dict()
    out = {}
    for k, shape in HUB_KEYS:
        out[k] = torch.randn(1, 768, generator=torch.Generator().manual_seed(9)) if k == "mask_token" else sd[k]
        assert tuple(out[k].shape) == shape, k
    return out


@pytest.fixture(scope="module")
def hub_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "dinov2_vitb14_pretrain.pth")
    sd = _hub_state()
    torch.save(sd, path)               # what torch.hub.load_state_dict_from_url downloads: a bare state dict
    return path, sd


def test_hub_keys_are_the_ones_the_loader_expects():
    assert expected_keys("dinov2_vitb14", "hub") == dict(HUB_KEYS)
    assert list(expected_keys("dinov2_vitb14", "timm")) == [k for k, _ in HUB_KEYS if k != "mask_token"]


@pytest.mark.slow   # a full-size ViT-B/14 file (350 MB) written, read twice and run once: ~15 s on a quiet 2-core CPU
def test_hub_and_timm_formats_load_to_the_same_teacher(hub_file, tmp_path):
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import _convert_dinov2

    path, sd = hub_file
    # timm's own conversion of the hub file and timm's model agree with our mapping
    tm = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=224)
    conv = _convert_dinov2(dict(sd), tm)
    assert conv.keys() == hub_to_timm(sd).keys() == tm.state_dict().keys()
    back = timm_to_hub(hub_to_timm(sd), mask_token=sd["mask_token"])
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert torch.equal(timm_to_hub(hub_to_timm(sd))["mask_token"], torch.zeros(1, 768))
    tpath = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in conv.items()}, tpath)
    hub_t, timm_t = load_teacher(path), load_teacher(tpath)
    assert hub_t.num_tokens == 256 and hub_t.dim == 768 and hub_t.input_size == 224
    # the position table: timm's resample_abs_pos_embed defaults (bicubic, antialias), as REPA's load_encoders
    want = resample_abs_pos_embed(sd["pos_embed"], [16, 16])
    assert torch.equal(hub_t.net.pos_embed.data, want) and torch.equal(timm_t.net.pos_embed.data, want)
    assert hub_t.content_fingerprint() == timm_t.content_fingerprint()
    # the loaded teacher is timm's DINOv2 with that table, on a REPA-preprocessed image
    tm.load_state_dict({**conv, "pos_embed": want}, strict=True)
    raw = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tm.eval().forward_features(repa_preprocess(raw, 224))[:, 1:]
    torch.testing.assert_close(hub_t(raw), ref, atol=2e-4, rtol=1e-4)


def test_refusals_name_the_file_and_keys(tmp_path):
    sd = {k: torch.zeros(1).expand(s) for k, s in HUB_KEYS}    # the hub's keys and shapes, one-element storages
    missing = str(tmp_path / "nowhere" / "dinov2_vitb14_pretrain.pth")
    with pytest.raises(FileNotFoundError) as e:
        load_teacher(missing)
    msg = str(e.value)
    assert missing in msg and "Nothing is downloaded" in msg and HUB_URL in msg and "repa.teacher_path" in msg

    def refused(d, *patterns):
        p = str(tmp_path / f"bad{len(list(tmp_path.iterdir()))}.pth")
        torch.save(d, p)
        with pytest.raises(TeacherWeightsError) as err:
            load_teacher(p)
        for pat in (p,) + patterns:
            assert pat in str(err.value), (pat, str(err.value))

    refused({k: v for k, v in sd.items() if not k.startswith("blocks.11.")}, "missing 14",
            "'blocks.11.norm1.weight'")
    refused({**sd, "register_tokens": torch.zeros(1).expand(1, 4, 768)}, "unexpected 1", "register_tokens",
            "registers")
    refused({**sd, "patch_embed.proj.weight": torch.zeros(1).expand(768, 3, 16, 16)}, "patch size (16, 16)",
            "patch_embed.proj.weight")
    refused({**sd, "blocks.3.mlp.fc1.weight": torch.zeros(1).expand(1024, 768)}, "blocks.3.mlp.fc1.weight (1024, 768)")
    p = str(tmp_path / "list.pth")
    torch.save([torch.zeros(2)], p)
    with pytest.raises(TeacherWeightsError, match="bare state dict"):
        load_teacher(p)


# ------------------------------------------------------------------------------------------- REPA's input
def repa_preprocess_raw_image(x):
    """REPA train.py preprocess_raw_image, DINOv2 branch, as written there (torchvision Normalize, F.interpolate)."""
    from torchvision.transforms import Normalize
    resolution = x.shape[-1]
    x = x / 255.
    x = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(x)
    return F.interpolate(x, 224 * (resolution // 256), mode="bicubic")


@pytest.mark.parametrize("res,tokens", [(256, 256), (512, 1024)])
def test_preprocessing_is_repas(res, tokens):
    raw = torch.randint(0, 256, (2, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(res))
    size = repa_input_size(res)
    assert size == 224 * (res // 256) and (size // 14) ** 2 == tokens
    assert torch.equal(repa_preprocess(raw, size), repa_preprocess_raw_image(raw))
    assert torch.equal(repa_preprocess(raw.float(), size), repa_preprocess_raw_image(raw))
    # an SiT-XL/2 on res/8 latents has (res/16)^2 tokens: the teacher's count at REPA's size
    check_token_count(tokens, (res // 16) ** 2)


def test_default_input_is_repas_for_dinov2_and_the_teachers_own_for_synthetic_vit():
    """repa.teacher_input_size=0: REPA's 224 x (S // 256) for DINOv2 (256 -> 224, 512 -> 448); the shipped
    synthetic-vit keeps REPA's 7/8 at its 64 px (56 px, 4 x 4 tokens = SiT-tiny/2's on 8 x 8 latents). The config
    resolves the same sizes, and DINOv2 at 64 px is refused, naming the size to set."""
    from usp_scale.config import ConfigError, load_config
    from usp_scale.models.teacher import teacher_input_size, teacher_shape

    assert [teacher_input_size("dinov2_vitb14", s) for s in (256, 512)] == [224, 448]
    assert teacher_shape("dinov2_vitb14", 256) == (256, 768) and teacher_shape("synthetic-vit", 64) == (16, 64)
    assert teacher_input_size("synthetic-vit", 64) == 56 and teacher_input_size("dinov2_tiny_test", 512) == 448
    base = ["task=sit", "model.name=SiT-tiny/2-REPA", "model.learn_sigma=false", "data.format=synthetic",
            "repa.enabled=true", "repa.features=online", "repa.encoder_depth=1"]
    cfg_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "debug",
                            "synthetic_pretrain.yaml")
    from usp_scale.config.validate import repa_teacher_input
    cfg = load_config(cfg_path, base + ["repa.teacher=synthetic-vit", "repa.teacher_path=synthetic-vit"])
    assert repa_teacher_input(cfg) == 56
    with pytest.raises(ConfigError, match=r"teacher input is empty.*repa.teacher_input_size=56"):
        load_config(cfg_path, base + ["repa.teacher_path=x.pth"])
    cfg = load_config(cfg_path, base + ["repa.teacher_path=x.pth", "data.image_size=256", "model.img_size=32",
                                        "model.name=SiT-XL/2-REPA"])
    assert repa_teacher_input(cfg) == 224


def test_token_count_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"256 patch tokens .* model has 1024"):
        check_token_count((224 // 14) ** 2, (512 // 16) ** 2)      # 512 px images resized to 224, not 448
    with pytest.raises(ValueError, match="224 \\* \\(128 // 256\\)"):
        repa_input_size(128)
    net = DINOv2ViT(TINY, grid=2)
    t = FrozenTeacher(net, name="tiny", image_size=28)
    with pytest.raises(ValueError, match="model has 16"):
        t.check_tokens(16)


def test_unit_range_crops_give_back_their_raw_pixels():
    from usp_scale.data.transforms import to_unit_range
    from PIL import Image
    raw = torch.randint(0, 256, (3, 9, 13), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    img = Image.fromarray(raw.permute(1, 2, 0).numpy())
    x = to_unit_range()(img)                           # what the project's crops are
    assert torch.equal(raw_from_unit_range(x[None])[0], raw.float())


# ------------------------------------------------------------------------------------------- frozen
def test_teacher_is_frozen_and_outside_every_model():
    net = _randomise(DINOv2ViT(TINY, grid=2))
    net.train()
    teacher = FrozenTeacher(net, name="tiny", image_size=32)
    assert not isinstance(teacher, nn.Module)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    student = nn.Linear(4, 4)
    student.teacher = teacher                          # assigned to a model: not a submodule
    assert set(student.state_dict()) == {"weight", "bias"} and len(list(student.parameters())) == 2
    raw = torch.randint(0, 256, (2, 3, 32, 32)).float().requires_grad_(True)
    out = teacher(raw)
    assert out.shape == (2, 4, 36) and not out.requires_grad
    assert torch.equal(out, net(repa_preprocess(raw.detach(), 28)))
    net.train()
    with pytest.raises(RuntimeError, match="frozen"):
        teacher(raw)
    net.eval()
    with pytest.raises(ValueError, match="32 px images"):
        teacher(torch.zeros(1, 3, 48, 48))
    ident = teacher.identity()
    assert ident["tokens"] == 4 and ident["preprocessing"]["resize"] == {
        "from": 32, "to": 28, "mode": "bicubic", "align_corners": False, "antialias": False}
    before = teacher.content_fingerprint()
    other = FrozenTeacher(_randomise(DINOv2ViT(TINY, grid=2), seed=5), name="tiny", image_size=32)
    assert other.content_fingerprint() != before
    assert math.isfinite(teacher.flops_per_image())
