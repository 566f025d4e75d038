"""The model contract (usp_scale/models/contract.py) over every registered name, as timm's tests/test_models.py
checks its registry: meta-device builds for the structural parts (weight-decay and layer groups against timm's
own group functions, the kernel and checkpointing switches, FLOPs), tiny real models for what needs numbers
(FLOPs against torch's FLOP counter, activation checkpointing recomputes and changes nothing)."""
import copy
import importlib

import pytest
import torch
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch.utils.flop_counter import FlopCounterMode

from usp_scale.kernels.dispatch import IMPLS
from usp_scale.models import create_model, list_models, model_family
from usp_scale.models.contract import CheckpointBlock, LatentTransformer
from usp_scale.training.optim import model_param_groups

A = importlib.import_module("usp_scale.layers.attention")
ALL = list_models()
TINY = {"mae": "vit_tiny_patch_vae", "dit": "DiT-tiny/2-VAE-simple", "sit": "SiT-tiny/2", "vit": "vit_tiny_patch16_vae",
        "lightningdit": "LightningDiT-tiny/1", "lightning_mae": "LightningMAE-tiny/1"}


def _meta(name):
    return create_model(name, device="meta")


def _by_name(model, groups, keys=("weight_decay", "lr_scale")):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: tuple(g.get(k, 1.0) for k in keys) for g in groups for p in g["params"]}


def test_every_family_is_in_the_registry():
    assert {model_family(n) for n in ALL} == {"mae", "dit", "sit", "vit", "lightningdit"}


@pytest.mark.parametrize("name", ALL)
def test_contract_structure(name):
    m = _meta(name)
    assert isinstance(m, LatentTransformer)
    params = dict(m.named_parameters())
    assert m.no_weight_decay() <= set(params)
    # one layer-id rule: layer_id and the timm group_matcher give the same ids, 0 .. depth + 1
    ids = {n: m.layer_id(n) for n in params}
    assert group_parameters(m, m.group_matcher(coarse=False), reverse=True) == ids
    assert set(ids.values()) == set(range(m.num_layers + 1)) and m.num_layers == len(m.blocks) + 1
    assert all(ids[n] == int(n.split(".")[1]) + 1 for n in params if n.startswith("blocks."))
    # kernels: one switch for every fused op of the model
    for mode in IMPLS:
        m.set_kernels(mode)
        assert m.kernels == mode and all(x.kernels == mode for x in m.modules() if hasattr(x, "kernels"))
    with pytest.raises(ValueError, match="model.kernels must be one of"):
        m.set_kernels("cuda")
    # activation checkpointing: every transformer block, encoder and decoder
    n_blocks = len(m.blocks) + len(getattr(m, "decoder_blocks", ()))
    assert m.set_grad_checkpointing() == n_blocks
    assert all(b.grad_checkpointing for b in m.modules() if isinstance(b, CheckpointBlock))
    m.set_grad_checkpointing(False)
    assert not any(b.grad_checkpointing for b in m.modules() if isinstance(b, CheckpointBlock))
    # FLOPs: the MAE's depend on the mask ratio (its encoder sees the kept tokens); the others take none
    if model_family(name) == "mae":
        f50, f75 = m.flops_per_sample(mask_ratio=0.5), m.flops_per_sample(mask_ratio=0.75)
        assert f50 > f75 > 0
    else:
        assert m.flops_per_sample() > 0
        with pytest.raises(TypeError):
            m.flops_per_sample(mask_ratio=0.5)
    # attention: one spec for every attention module, set through the contract
    n_attn = sum(isinstance(x, A.Attention) for x in m.modules())
    assert n_attn and m.set_attn_backend("reference") == n_attn


@pytest.mark.parametrize("name", ALL)
def test_optimizer_groups_are_the_official_ones(name):
    """model_param_groups reads no_weight_decay(): pretraining and DiT/SiT get exactly timm's
    param_groups_weight_decay (cls/mask tokens decayed), the classifier timm's param_groups_layer_decay with its
    no_weight_decay() list (pos_embed, cls_token) over the model's group_matcher."""
    m = _meta(name)
    if model_family(name) == "vit":
        ours = model_param_groups(m, 0.05, layer_decay=0.75)
        ref = param_groups_layer_decay(m, 0.05, no_weight_decay_list=m.no_weight_decay(), layer_decay=0.75)
        assert {"pos_embed", "cls_token"} <= m.no_weight_decay()
    else:
        ours = model_param_groups(m, 0.05)
        ref = param_groups_weight_decay(m, 0.05)
        assert m.no_weight_decay() == set()
    assert _by_name(m, ours) == _by_name(m, ref)
    if model_family(name) == "mae":
        wd = _by_name(m, ours, ("weight_decay",))
        assert wd.get("cls_token", (0.05,)) == wd["mask_token"] == (0.05,) and "pos_embed" not in wd


# ------------------------------------------------------------------------------------------- tiny, real
def _inputs(family, g):
    if family in ("dit", "sit"):
        return (torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g) * 999,
                torch.randint(0, 10, (2,), generator=g))
    if family == "lightningdit":
        return (torch.randn(2, 32, 4, 4, generator=g), torch.rand(2, generator=g),
                torch.randint(0, 10, (2,), generator=g))
    if family == "lightning_mae":
        return (torch.randn(2, 32, 4, 4, generator=g),)
    return (torch.randn(2, 4, 28, 28, generator=g),)


def _loss(family, m, inputs, mask_ratio=0.75):
    if family in ("mae", "lightning_mae"):
        noise = torch.rand(2, m.num_patches, generator=torch.Generator().manual_seed(5))
        return m(inputs[0], mask_ratio=mask_ratio, noise=noise)[0]
    return m(*inputs).float().square().mean()


@pytest.mark.parametrize("family", sorted(TINY))
def test_flops_per_sample_equals_the_counted_forward(family):
    # attention "reference": plain matmuls, so every attention FLOP is counted
    m = create_model(TINY[family], kernels="torch", attn_backend="reference").eval()
    inputs = _inputs(family, torch.Generator().manual_seed(0))
    for ratio in ((0.5, 0.75, 0.9) if family in ("mae", "lightning_mae") else (0.75,)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            _loss(family, m, inputs, mask_ratio=ratio)
        want = m.flops_per_sample(mask_ratio=ratio) if family in ("mae", "lightning_mae") else m.flops_per_sample()
        assert counter.get_total_flops() / 2 == pytest.approx(want, rel=1e-9), ratio


@pytest.mark.parametrize("family", sorted(TINY))
def test_grad_checkpointing_recomputes_and_changes_nothing(family):
    torch.manual_seed(0)
    ref = create_model(TINY[family], kernels="torch")
    with torch.no_grad():   # off the zero inits (adaLN-zero, heads), so every block matters
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ac = copy.deepcopy(ref)
    n_blocks = ac.set_grad_checkpointing(True)
    ref.eval(), ac.eval()   # no label dropout
    inputs = _inputs(family, torch.Generator().manual_seed(1))
    calls = {"ref": 0, "ac": 0}
    for key, model in (("ref", ref), ("ac", ac)):
        for mod in model.modules():
            if isinstance(mod, A.Attention):
                mod.register_forward_hook(lambda *_, k=key: calls.__setitem__(k, calls[k] + 1))
    loss_r, loss_a = _loss(family, ref, inputs), _loss(family, ac, inputs)
    loss_r.backward()
    loss_a.backward()
    assert calls["ref"] == n_blocks and calls["ac"] == 2 * n_blocks          # each block's forward ran again
    assert torch.equal(loss_r, loss_a)
    for (n, p), q in zip(ref.named_parameters(), ac.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n
