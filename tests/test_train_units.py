"""Fast unit tests of the training system: schedule, param groups, LARS, EMA, DeepSpeed config, dist env."""
import math
import os

import pytest
import torch
import torch.nn as nn

from usp_scale.config import ConfigError, OptimConfig, ScheduleConfig
from usp_scale.cluster.hosts import expand_slurm_nodelist
from usp_scale.engine.deepspeed.config import generate_config, merge_user_config
from usp_scale.runtime import detect
from usp_scale.models import create_model
from usp_scale.training.ema import EMA
from usp_scale.training.optim import LARS, build_optimizer, param_groups
from usp_scale.training.schedule import LRSchedule


def _mae():
    return create_model("vit_tiny_patch_vae", img_size=8, in_chans=4)


def _classifier():
    return create_model("vit_tiny_patch16_vae", img_size=8, in_chans=4, num_classes=10)  # depth 2


# ------------------------------------------------------------------------------------------ schedule

def test_pretrain_schedule_matches_spec_numbers():
    """docs/method.md §2.6: 4096 batch, blr 1.5e-4 -> lr 2.4e-3; 312 it/epoch, 40 warmup epochs, 800 epochs."""
    s = LRSchedule.from_config(ScheduleConfig(epochs=800, warmup_epochs=40), OptimConfig(blr=1.5e-4, min_lr=0.0),
                               global_batch=4096, steps_per_epoch=312)
    assert s.lr == pytest.approx(2.4e-3)
    assert s.total_steps == 249_600 and s.warmup_steps == 12_480
    assert s(0) == 0.0  # the first step has lr 0
    assert s(6_240) == pytest.approx(1.2e-3)
    assert s(12_480) == pytest.approx(2.4e-3)
    assert s((12_480 + 249_600) // 2) == pytest.approx(1.2e-3)
    assert s(249_600) == pytest.approx(0.0, abs=1e-15)
    # MAE's own formula on the fractional epoch e = it / 312 (accum 1)
    for it in (1, 100, 12_479, 12_481, 50_000, 200_001, 249_599):
        e = it / 312
        ref = 2.4e-3 * e / 40 if e < 40 else 2.4e-3 * 0.5 * (1 + math.cos(math.pi * (e - 40) / (800 - 40)))
        assert s(it) == pytest.approx(ref, rel=1e-12, abs=1e-18)


def test_schedule_with_accumulation_min_lr_and_layer_scale():
    # 624 micro-batches/epoch, accum 2 -> 312 optimizer steps; MAE sets lr at e = data_iter_step / 624 + epoch.
    s = LRSchedule.from_config(ScheduleConfig(epochs=50, warmup_epochs=5), OptimConfig(blr=1e-3, min_lr=1e-6),
                               global_batch=1024, steps_per_epoch=312)
    for step in (0, 700, 1560, 5000, 15_599):
        e = step * 2 / 624
        ref = 4e-3 * e / 5 if e < 5 else 1e-6 + (4e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (e - 5) / 45))
        assert s(step) == pytest.approx(ref, rel=1e-12)
    groups = [{"lr": 0.0, "lr_scale": 0.75 ** 3}, {"lr": 0.0}]
    lr = s.apply(groups, 2000)
    assert groups[0]["lr"] == pytest.approx(lr * 0.421875) and groups[1]["lr"] == lr


def test_constant_schedule_and_max_steps():
    s = LRSchedule.from_config(ScheduleConfig(name="constant", max_steps=400_000), OptimConfig(lr=1e-4),
                               global_batch=256, steps_per_epoch=5004)
    assert s.total_steps == 400_000 and s(0) == s(399_999) == 1e-4
    with pytest.raises(ConfigError, match="schedule.name"):
        LRSchedule.from_config(ScheduleConfig(name="step"), OptimConfig(), global_batch=1, steps_per_epoch=1)


# ------------------------------------------------------------------------------------------ param groups

def test_pretrain_weight_decay_groups_follow_timm_rule():
    """ndim <= 1 and '.bias' undecayed; cls/mask tokens (3-D) decayed; frozen pos embeds not in the optimizer."""
    m = _mae()
    groups = param_groups(m, 0.05)
    by_name = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert "pos_embed" not in by_name and "decoder_pos_embed" not in by_name
    assert by_name["cls_token"] == 0.05 and by_name["mask_token"] == 0.05
    assert by_name["patch_embed.proj.weight"] == 0.05 and by_name["patch_embed.proj.bias"] == 0.0
    assert by_name["blocks.0.norm1.weight"] == 0.0 and by_name["blocks.0.mlp.fc1.weight"] == 0.05
    n_trainable = sum(1 for p in m.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable


def test_layer_decay_groups_hand_computed():
    """depth 2 -> num_layers 3: embeddings 0.75^3, block0 0.75^2, block1 0.75, head/fc_norm 1."""
    m = _classifier()
    groups = param_groups(m, 0.05, no_weight_decay_list=m.no_weight_decay(), layer_decay=0.75)
    scale = {n: (g["lr_scale"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    assert scale["patch_embed.proj.weight"] == (0.421875, 0.05)
    assert scale["pos_embed"] == (0.421875, 0.0) and scale["cls_token"] == (0.421875, 0.0)
    assert scale["blocks.0.mlp.fc1.weight"] == (0.5625, 0.05) and scale["blocks.0.mlp.fc1.bias"] == (0.5625, 0.0)
    assert scale["blocks.1.mlp.fc2.weight"] == (0.75, 0.05)
    assert scale["head.weight"] == (1.0, 0.05) and scale["fc_norm.weight"] == (1.0, 0.0)
    # the model's group_matcher through timm's own param_groups_layer_decay gives the same scales and decays
    from timm.optim import param_groups_layer_decay

    timm_groups = param_groups_layer_decay(m, 0.05, no_weight_decay_list=m.no_weight_decay(), layer_decay=0.75)
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in timm_groups for p in g["params"]} == scale


def test_lars_step_hand_computed():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w, b], "weight_decay": 0.1}], lr=0.5, momentum=0.9, trust_coefficient=0.001)
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([2.0])
    opt.step()
    d = torch.tensor([[0.3, 1.4]])  # g + 0.1 w
    q = 0.001 * 5.0 / d.norm()
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * q * d)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 2.0]))  # 1-D: no decay, no scaling
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([2.0])
    before = b.detach().clone()
    opt.step()
    assert torch.allclose(b.detach(), before - 0.5 * (0.9 * 2.0 + 2.0))  # momentum buffer


def test_build_optimizer_errors_and_adamw_settings():
    m = _mae()
    opt = build_optimizer(OptimConfig(lr=1e-3), param_groups(m, 0.05), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    with pytest.raises(ConfigError, match="apex"):
        build_optimizer(OptimConfig(apex=True), param_groups(m, 0.05), torch.device("cpu"))
    with pytest.raises(ConfigError, match="optim.name"):
        build_optimizer(OptimConfig(name="sgd"), param_groups(m, 0.05), torch.device("cpu"))


def test_ema_update_formula():
    p = torch.tensor([1.0, 2.0])
    ema = EMA([("w", p)], 0.9)
    ema.update([("w", torch.tensor([2.0, 0.0]))])
    assert torch.allclose(ema.shadow["w"], torch.tensor([1.1, 1.8]))
    assert ema.shadow["w"].dtype == torch.float32
    ema16 = EMA([("w", p.bfloat16())], 0.5)
    assert ema16.shadow["w"].dtype == torch.float32


# ------------------------------------------------------------------------------------------ deepspeed config

def test_deepspeed_config_generated_and_merged():
    gen = generate_config(micro_batch=64, accum_iter=2, world_size=8, zero_stage=2, precision="bf16", clip_grad=1.0)
    assert gen["train_batch_size"] == 1024 and gen["zero_optimization"]["stage"] == 2 and gen["bf16"]["enabled"]
    assert gen["communication_data_type"] == "fp32"  # gradients reduced in fp32 unless engine.reduce_dtype=bf16
    user = {"zero_optimization": {"stage": 2, "overlap_comm": True}, "train_micro_batch_size_per_gpu": "auto",
            "prescale_gradients": False}
    merged = merge_user_config(gen, user)
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert merged["train_micro_batch_size_per_gpu"] == 64 and merged["prescale_gradients"] is False
    with pytest.raises(ConfigError, match="communication_data_type.*engine.reduce_dtype"):
        merge_user_config(gen, {"communication_data_type": "bf16"})
    gen16 = generate_config(micro_batch=64, accum_iter=2, world_size=8, zero_stage=2, precision="bf16", clip_grad=1.0,
                            reduce_dtype="bf16")
    assert merge_user_config(gen16, {"communication_data_type": "bf16"})["communication_data_type"] == "bf16"


def test_deepspeed_config_conflicts_are_listed():
    gen = generate_config(micro_batch=64, accum_iter=1, world_size=2, zero_stage=2, precision="fp32", clip_grad=0.0)
    user = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 32, "optimizer": {"type": "Adam"}}
    with pytest.raises(ConfigError) as e:
        merge_user_config(gen, user, "ds.json")
    msg = str(e.value)
    assert "zero_optimization.stage" in msg and "engine.zero_stage" in msg
    assert "train_micro_batch_size_per_gpu" in msg and "data.batch_size" in msg and "'optimizer'" in msg


# ------------------------------------------------------------------------------------------ dist env

def test_detect_torchrun_deepspeed_slurm_envs():
    tr = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                 "MASTER_ADDR": "n1", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port, tr.launcher) == \
        (3, 8, 1, "n1", 1234, "torchrun")
    ds = detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29500"}, local_rank_arg=1)
    assert (ds.rank, ds.world_size, ds.launcher) == (1, 2, "deepspeed")
    sl = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8",
                 "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_addr, sl.launcher) == (5, 16, 1, "gpu07", "slurm")
    assert sl.master_port == 20000 + 4242
    one = detect({})
    assert (one.rank, one.world_size, one.distributed) == (0, 1, False)


def test_expand_slurm_nodelist():
    assert expand_slurm_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_slurm_nodelist("node1") == ["node1"]
    assert expand_slurm_nodelist("a[9-11]") == ["a9", "a10", "a11"]


# ------------------------------------------------------------------------------------------ engine switches

def _engine_run(**kw):
    import _helpers_train as H

    return H.engine_losses(H.engine_cfg("local", **kw), clip=1.0)


def test_activation_checkpointing_gives_identical_steps():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    ref_l, _, ref_sd = _engine_run()
    ac_l, _, ac_sd = _engine_run(activation_checkpointing=True)
    assert ac_l == ref_l
    assert all(torch.equal(torch.tensor(ref_sd[k]), torch.tensor(ac_sd[k])) for k in ref_sd)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_autocast_and_grad_scaler_on_cpu(precision):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    ref_l, _, _ = _engine_run()
    lp_l, applied, _ = _engine_run(precision=precision)
    assert all(applied)
    assert lp_l == pytest.approx(ref_l, rel=5e-2)
    assert lp_l != ref_l  # autocast really changed the arithmetic


def test_unknown_engine_and_precision_are_errors():
    """Refused when the config loads (the schema's choices); the engine resolves "auto" per device."""
    from usp_scale.config import load_config
    from usp_scale.engine.base import device_precision

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "debug", "tiny.yaml")
    with pytest.raises(ConfigError, match="engine.name='horovod'"):
        load_config(tiny, ["engine.name=horovod"])
    with pytest.raises(ConfigError, match="engine.precision='fp8'"):
        load_config(tiny, ["engine.precision=fp8"])
    assert device_precision("auto", torch.device("cpu")) == "fp32"
    assert device_precision("auto", torch.device("cuda")) == "bf16"


@pytest.mark.slow
def test_compile_switch_matches_eager():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    ref_l, _, _ = _engine_run()
    for scope in ("model", "blocks"):
        c_l, applied, _ = _engine_run(compile=True, compile_scope=scope)
        assert all(applied) and c_l == pytest.approx(ref_l, rel=1e-4)
