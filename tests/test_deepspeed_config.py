"""The DeepSpeed JSON generated from our config (a pure function) and a user JSON merged over it: every owned key,
the JobConfig mapping, and errors that name the file and the key. No process group, no engine."""
import copy
import json

import pytest

from usp_scale.config import ConfigError, JobConfig, config_from_dict
from usp_scale.engine.deepspeed.config import (OWNED_KEYS, build_config, config_for_job, generate_config,
                                               merge_user_config)


def _gen(**kw):
    base = dict(micro_batch=4, accum_iter=1, world_size=2, zero_stage=2, precision="fp32", clip_grad=0.0)
    return generate_config(**{**base, **kw})


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage(stage):
    assert _gen(zero_stage=stage)["zero_optimization"] == {"stage": stage}


@pytest.mark.parametrize("stage", [0, 4, "2"])
def test_zero_stage_out_of_range_names_the_key(stage):
    """Refused when the config loads (the schema's choices: the one place); the generator trusts the config."""
    with pytest.raises(ConfigError, match="engine.zero_stage"):
        config_from_dict({"model": {"name": "vit_tiny_patch_vae"}, "engine": {"zero_stage": stage}}, validate=True)


@pytest.mark.parametrize("precision,device,bf16,fp16", [("fp32", "cpu", False, False), ("bf16", "cpu", True, False),
                                                        ("bf16", "cuda", True, False), ("fp16", "cuda", False, True)])
def test_precision(precision, device, bf16, fp16):
    cfg = _gen(precision=precision, device_type=device)
    assert cfg["bf16"] == {"enabled": bf16} and cfg["fp16"] == {"enabled": fp16}


def test_fp16_on_cpu_is_an_error():
    with pytest.raises(ConfigError, match="not supported by DeepSpeed on CPU"):
        _gen(precision="fp16")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_reduce_dtype(dtype):
    assert _gen(precision="bf16", reduce_dtype=dtype)["communication_data_type"] == dtype


def test_reduce_dtype_default():
    assert _gen()["communication_data_type"] == "fp32"


@pytest.mark.parametrize("micro,accum,world", [(4, 1, 1), (4, 3, 2), (1, 8, 16)])
def test_accumulation_and_batch_sizes(micro, accum, world):
    cfg = _gen(micro_batch=micro, accum_iter=accum, world_size=world)
    assert cfg["train_micro_batch_size_per_gpu"] == micro and cfg["gradient_accumulation_steps"] == accum
    assert cfg["train_batch_size"] == micro * accum * world


@pytest.mark.parametrize("clip", [0.0, 1.0, 3])
def test_clipping(clip):
    cfg = _gen(clip_grad=clip)
    assert cfg["gradient_clipping"] == float(clip) and isinstance(cfg["gradient_clipping"], float)


def test_generated_config_owns_exactly_the_listed_keys():
    cfg = _gen()
    flat = {"zero_optimization.stage", "bf16.enabled", "fp16.enabled"} | {k for k in cfg if not isinstance(cfg[k],
                                                                                                           dict)}
    assert set(OWNED_KEYS) <= flat
    # usp_scale builds the optimizer; DeepSpeed must accept a torch one under ZeRO
    assert cfg["zero_allow_untested_optimizer"] is True and "optimizer" not in cfg and "scheduler" not in cfg


def test_config_for_job_reads_the_job_fields():
    job = JobConfig()
    job.data.batch_size, job.schedule.accum_iter, job.optim.clip_grad = 8, 4, 2.0
    job.engine.zero_stage, job.engine.precision, job.engine.reduce_dtype = 3, "bf16", "bf16"
    cfg = config_for_job(job, 4)
    assert cfg == _gen(micro_batch=8, accum_iter=4, world_size=4, zero_stage=3, precision="bf16", clip_grad=2.0,
                       reduce_dtype="bf16")
    job.engine.precision = "auto"  # resolved per device, as the engines resolve it
    assert config_for_job(job, 4)["bf16"]["enabled"] is False
    assert config_for_job(job, 4, device_type="cuda")["bf16"]["enabled"] is True


def test_config_for_job_merges_the_user_json(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": "auto"}))
    job = JobConfig()
    job.engine.precision, job.engine.deepspeed_config = "fp32", str(path)
    cfg = config_for_job(job, 2)
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert cfg["gradient_clipping"] == job.optim.clip_grad


# ---------------------------------------------------------------- merging a user JSON
def test_merge_keeps_inputs_and_auto_and_equal_values():
    gen = _gen(precision="bf16", clip_grad=1.0)
    user = {"bf16": {"enabled": True}, "gradient_clipping": 1.0, "train_batch_size": "auto",
            "zero_optimization": {"overlap_comm": True, "offload_optimizer": {"device": "none"}}}
    gen0, user0 = copy.deepcopy(gen), copy.deepcopy(user)
    merged = merge_user_config(gen, user, "ds.json")
    assert gen == gen0 and user == user0  # neither input changes
    assert merged["train_batch_size"] == gen["train_batch_size"]
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True, "offload_optimizer": {"device": "none"}}
    merged["zero_optimization"]["offload_optimizer"]["device"] = "cpu"
    assert user["zero_optimization"]["offload_optimizer"]["device"] == "none"  # no aliasing into the user dict


@pytest.mark.parametrize("key,value,owner", [("train_micro_batch_size_per_gpu", 8, "data.batch_size"),
                                             ("gradient_accumulation_steps", 2, "schedule.accum_iter"),
                                             ("train_batch_size", 64, "world size"),
                                             ("zero_optimization", {"stage": 3}, "engine.zero_stage"),
                                             ("bf16", {"enabled": True}, "engine.precision"),
                                             ("fp16", {"enabled": True}, "engine.precision"),
                                             ("gradient_clipping", 0.5, "optim.clip_grad"),
                                             ("communication_data_type", "bf16", "engine.reduce_dtype")])
def test_every_owned_key_conflict_names_the_file_and_our_key(key, value, owner):
    with pytest.raises(ConfigError) as e:
        merge_user_config(_gen(), {key: value}, "my/ds.json")
    msg = str(e.value)
    assert "my/ds.json" in msg and owner in msg and f"'{key}" in msg


@pytest.mark.parametrize("key", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_are_ours(key):
    with pytest.raises(ConfigError, match=f"'{key}'.*remove it from ds.json"):
        merge_user_config(_gen(), {key: {"type": "Adam"}}, "ds.json")


@pytest.mark.parametrize("user,key", [({"zero_optimization": 3}, "'zero_optimization'"),
                                      ({"bf16": True}, "'bf16'"),
                                      ({"gradient_clipping": {"value": 1.0}}, "'gradient_clipping'")])
def test_object_where_a_value_belongs_and_back(user, key):
    with pytest.raises(ConfigError) as e:
        merge_user_config(_gen(), user, "ds.json")
    assert key in str(e.value) and "ds.json" in str(e.value)


def test_all_conflicts_are_listed_at_once():
    user = {"optimizer": {}, "gradient_clipping": 9.0, "zero_optimization": {"stage": 1}}
    with pytest.raises(ConfigError) as e:
        merge_user_config(_gen(), user, "ds.json")
    msg = str(e.value)
    assert "'optimizer'" in msg and "'gradient_clipping'" in msg and "'zero_optimization.stage'" in msg


# ---------------------------------------------------------------- validation by DeepSpeed's own parser
def _write(tmp_path, obj):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(obj))
    return str(path)


def _build(path, **kw):
    base = dict(micro_batch=4, accum_iter=2, world_size=8, zero_stage=2, precision="bf16", clip_grad=1.0)
    return build_config(**{**base, **kw}, user_config=path)


def test_valid_user_json_passes_validation_for_any_world_size(tmp_path):
    path = _write(tmp_path, {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 5e7},
                             "data_types": {"grad_accum_dtype": "fp32"}})
    cfg = _build(path)  # train_batch_size = 64 on 8 ranks, validated in a process without any process group
    assert cfg["train_batch_size"] == 64 and cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["zero_optimization"]["overlap_comm"] is True


@pytest.mark.parametrize("user,key", [({"zero_optimization": {"overlap_comms": True}},
                                       "zero_optimization.overlap_comms"),
                                      ({"zero_optimization": {"reduce_bucket_size": "big"}},
                                       "zero_optimization.reduce_bucket_size"),
                                      ({"zero_optimization": {"offload_optimizer": {"device": "disk"}}},
                                       "zero_optimization.offload_optimizer.device")])
def test_misspelt_or_mistyped_keys_name_the_file_and_the_key(tmp_path, user, key):
    path = _write(tmp_path, user)
    with pytest.raises(ConfigError) as e:
        _build(path)
    msg = str(e.value)
    assert msg.startswith(path) and f"'{key}'" in msg and "DeepSpeed" in msg, msg


@pytest.mark.parametrize("content,match", [(None, "file not found"), ("{", "invalid JSON"),
                                           ("[1, 2]", "must be a JSON object")])
def test_unreadable_user_json_names_the_file(tmp_path, content, match):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match) as e:
        _build(str(path))
    assert str(path) in str(e.value)
