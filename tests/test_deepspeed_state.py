"""The DeepSpeed internals usp_scale reads (usp_scale/engine/deepspeed/state.py), checked against the installed
DeepSpeed on real 1-rank engines (gloo, CPU): if a DeepSpeed release renames or relayouts one of them, these tests
fail here, naming it, instead of an EMA or an optimizer export going quietly wrong. Also the version range: the one
setup.py declares is the one the engine enforces, and the installed DeepSpeed is inside it."""
import json
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402

from usp_scale.config import ConfigError  # noqa: E402
from usp_scale.engine.deepspeed import DEEPSPEED_RANGE  # noqa: E402


def _forget_deepspeed_world_group():
    """DeepSpeed caches its clone of the world group (``deepspeed.utils.groups._WORLD_GROUP``, its data-parallel
    group) for the life of the process; after a test destroys the process group, the next engine would use the
    dead clone ("Group ... is not registered"). Tests only: a training process has one process group."""
    import deepspeed.utils.groups as groups

    groups._WORLD_GROUP = None


@pytest.fixture(scope="module")
def group():
    """A 1-rank gloo group for the module's engines (built by build_engine), torn down with its environment and
    DeepSpeed's cached clone of it, so that 1-rank engines of other test files in this worker start clean."""
    import torch.distributed as dist

    saved = dict(os.environ)
    if not dist.is_initialized():
        _forget_deepspeed_world_group()  # a clone of a group an earlier test destroyed
    H.init_group()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    _forget_deepspeed_world_group()
    os.environ.clear()
    os.environ.update(saved)


def _engine(tmp_path, stage, precision="bf16", user=None):
    from usp_scale.config import OptimConfig
    from usp_scale.engine import build_engine
    from usp_scale.training.optim import build_optimizer, param_groups

    cfg = H.engine_cfg("deepspeed", precision=precision, zero_stage=stage)
    if user is not None:
        cfg.deepspeed_config = str(tmp_path / "ds.json")
        (tmp_path / "ds.json").write_text(json.dumps(user))
    torch.manual_seed(0)
    ocfg = OptimConfig(lr=1e-2, weight_decay=0.05, eps=1e-4, fused=False)
    return build_engine(cfg, H.engine_model(), lambda m: build_optimizer(ocfg, param_groups(m, 0.05),
                                                                         torch.device("cpu")), micro_batch=4)


def _train_step(eng):
    x, y = H.engine_data(1, 1, 4)
    with eng.sync_context(), eng.autocast():
        loss = torch.nn.functional.cross_entropy(eng(x[0]).float(), y[0])
    eng.backward(loss)
    res = eng.step()
    assert res is not None and res.applied


def test_version_range_is_declared_once_and_installed():
    from packaging.specifiers import SpecifierSet

    import deepspeed
    from usp_scale.engine.deepspeed.engine import check_version

    setup = open(os.path.join(H.REPO, "setup.py")).read()
    declared = re.search(r'"deepspeed": \["deepspeed([^"]*)"\]', setup)
    assert declared and declared.group(1) == DEEPSPEED_RANGE, "setup.py's deepspeed extra != DEEPSPEED_RANGE"
    spec = SpecifierSet(DEEPSPEED_RANGE)
    assert deepspeed.__version__ in spec, f"the tests run DeepSpeed {deepspeed.__version__}, outside {spec}"
    check_version(deepspeed.__version__)
    for outside in ("0.19.0", "0.19.4", "0.20.0", "1.0.0"):  # 0.19.0 and 0.19.4 fail tests/ (docs/training.md)
        with pytest.raises(ConfigError, match=f"DeepSpeed {outside} is installed.*deepspeed>="):
            check_version(outside)


@pytest.mark.slow
@pytest.mark.parametrize("stage,user,optimizer", [(1, None, "DeepSpeedZeroOptimizer"),
                                                  (2, None, "DeepSpeedZeroOptimizer"),
                                                  (1, {"data_types": {"grad_accum_dtype": "fp32"}}, "BF16_Optimizer")])
def test_master_fragment_is_this_ranks_view_of_the_fp32_masters(group, tmp_path, stage, user, optimizer):
    """param._hp_mapping: on one rank every parameter's fragment is the whole parameter at offset 0, fp32, and a
    view of the masters (it follows the optimizer step)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from usp_scale.engine.deepspeed.state import master_fragment

    eng = _engine(tmp_path, stage, user=user)
    assert type(eng.model.optimizer).__name__ == optimizer and eng.weights.ema_from_masters
    named = [(n, p) for n, p in eng.unwrapped.named_parameters() if p.requires_grad]
    frags = {}
    for n, p in named:
        frag, start = master_fragment(p, n)
        full = safe_get_full_fp32_param(p)
        assert start == 0 and frag.dtype == torch.float32 and frag.dim() == 1 and frag.numel() == p.numel(), n
        assert torch.equal(frag, full.reshape(-1)), n
        frags[n] = (frag, frag.detach().clone())
    _train_step(eng)
    moved = 0
    for n, p in named:
        frag, before = frags[n]
        assert torch.equal(frag, safe_get_full_fp32_param(p).reshape(-1)), n  # a view: updated in place
        moved += not torch.equal(frag, before)
    assert moved == len(named)


@pytest.mark.slow
@pytest.mark.parametrize("stage,user,unlinked", [(1, None, True), (2, None, True),
                                                 (1, {"data_types": {"grad_accum_dtype": "fp32"}}, False)])
def test_link_optimizer_states_links_every_param_group(group, tmp_path, stage, user, unlinked):
    """DeepSpeedZeroOptimizer links optimizer state to the parameters of the first param group only (it steps the
    groups one by one and links after the first, when the later ones have no state yet); BF16_Optimizer steps all
    groups first. link_optimizer_states links all under both. The first assertions document the DeepSpeed
    behaviour the workaround exists for: when a release fixes it, this test says so."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from usp_scale.engine.deepspeed.state import link_optimizer_states

    eng = _engine(tmp_path, stage, user=user)
    _train_step(eng)
    params = dict(eng.unwrapped.named_parameters())
    first, later = eng.weights.group_names[0][0], eng.weights.group_names[1][0]
    assert safe_get_full_optimizer_state(params[first], "exp_avg") is not None
    if unlinked:
        with pytest.raises(ValueError, match="exp_avg not found in optimizer state fragment"):
            safe_get_full_optimizer_state(params[later], "exp_avg")
    else:
        assert safe_get_full_optimizer_state(params[later], "exp_avg") is not None
    link_optimizer_states(eng.model.optimizer)
    for names in eng.weights.group_names:
        for n in names:
            for k in ("exp_avg", "exp_avg_sq"):
                s = safe_get_full_optimizer_state(params[n], k)
                assert s is not None and s.numel() == params[n].numel() and s.dtype == torch.float32, (n, k)
                assert torch.isfinite(s).all() and s.abs().sum() > 0, (n, k)  # one step with gradients: non-zero
    # the full export then has every parameter, in torch's index layout
    osd = eng.weights.full_optimizer_state_dict()
    assert sorted(osd["state"]) == list(range(sum(len(g) for g in eng.weights.group_names)))


@pytest.mark.slow
def test_zero3_partition_attributes(group, tmp_path):
    """ds_tensor / ds_numel / ds_shape: the partition is padded to at least the full size on one rank, the full
    shape is the module's, and the local fp32 partition (the ZeRO-3 EMA source) fits in it."""
    from deepspeed.utils import safe_get_local_fp32_param

    from usp_scale.engine.deepspeed.state import zero3_partition

    ref = {n: p.shape for n, p in H.engine_model().named_parameters()}
    eng = _engine(tmp_path, 3, precision="fp32")
    assert eng.weights.layout == "per_rank" and not eng.weights.ema_from_masters
    for n, p in eng.unwrapped.named_parameters():
        part, numel, shape = zero3_partition(p)
        assert shape == ref[n] and numel == ref[n].numel() and part >= numel, n
        assert p.numel() == 0, n  # partitioned: the module parameter itself is empty outside a gather
        assert safe_get_local_fp32_param(p).numel() <= part, n
    # the gathered EMA of the partitions is the full model
    ema = eng.weights.gather_ema(dict(eng.weights.ema_sources()))
    full = eng.weights.full_model_state_dict()
    assert sorted(ema) == sorted(ref) and all(torch.equal(ema[n], full[n]) for n in ref)


@pytest.mark.slow
def test_dp_group_is_a_torch_process_group(group, tmp_path):
    import torch.distributed as dist

    eng = _engine(tmp_path, 2, precision="fp32")
    assert dist.get_world_size(eng.weights.dp_group) == dist.get_world_size() == 1


def test_missing_internals_fail_loudly_naming_them():
    from usp_scale.engine.deepspeed.state import (DeepSpeedInternalsError, link_optimizer_states, master_fragment,
                                                  zero3_partition)

    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(DeepSpeedInternalsError, match=r"_hp_mapping of 'w'.*deepspeed>="):
        master_fragment(p, "w")
    with pytest.raises(DeepSpeedInternalsError, match="ds_tensor / ds_numel / ds_shape"):
        zero3_partition(p)
    with pytest.raises(DeepSpeedInternalsError, match="bit16_groups"):
        link_optimizer_states(object())


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_exports_carry_the_frozen_tables_at_fp32(group, tmp_path, stage):
    """The MAE's fixed sin-cos position tables are frozen parameters: DeepSpeed's bf16 cast rounds them (no fp32
    master), up to ~2e-3 off; the export (full model state dict, and the EMA's over it) carries the fp32 table."""
    from usp_scale.config import OptimConfig
    from usp_scale.engine import build_engine
    from usp_scale.models import create_model
    from usp_scale.training.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch_vae", img_size=8, in_chans=4)
    tables = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert {"pos_embed", "decoder_pos_embed"} <= set(tables)
    assert any((t.bfloat16().float() - t).abs().max() > 1e-4 for t in tables.values())  # bf16 would round them
    cfg = H.engine_cfg("deepspeed", precision="bf16", zero_stage=stage)
    ocfg = OptimConfig(lr=1e-2, weight_decay=0.05, eps=1e-4, fused=False)
    eng = build_engine(cfg, model, lambda m: build_optimizer(ocfg, param_groups(m, 0.05), torch.device("cpu")),
                       micro_batch=4)
    x = torch.randn(4, 4, 8, 8)
    with eng.sync_context(), eng.autocast():
        loss = eng(x, mask_ratio=0.75)[0]
    eng.backward(loss)
    assert eng.step() is not None
    sd = eng.weights.full_model_state_dict()
    for n, t in tables.items():
        assert sd[n].dtype == torch.float32 and torch.equal(sd[n], t), n
    ema = eng.weights.full_ema_state_dict({k: v.detach().clone() for k, v in eng.weights.ema_sources()}, sd)
    assert all(torch.equal(ema[n], t) for n, t in tables.items())
