"""Config validation: one test per rule of usp_scale.config.validate.RULES (each breaks its rule on an otherwise valid
recipe and checks the error names every key of the rule and the source that set it), the rule table in
docs/config.md, and the examples of issue 11 (negative rates, mask.ratio=1, zero/negative batch sizes)."""
import math
import os

import pytest

from usp_scale.config import ConfigError, load_config
from usp_scale.config.schema import CacheJob, SampleJob, TransferJob
from usp_scale.config.validate import CHOICES, INT_CHOICES, RANGES, REQUIRED_STRINGS, RULES, model_patch_size, \
    rules_table, validate, validate_runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "debug", "tiny.yaml")          # pretrain, folder data, 64 px -> 8x8 latents
TINY_DIT = os.path.join(ROOT, "configs", "debug", "tiny_dit.yaml")  # dit, EMA, 60 steps

# a valid REPA job on the tiny recipe (the files are checked where they are read, not here)
REPA_OK = ["task=sit", "model.name=SiT-tiny/2-REPA", "model.learn_sigma=false", "repa.enabled=true",
           "repa.teacher=dinov2_tiny_test", "repa.teacher_path=t.pth", "repa.teacher_input_size=56",
           "repa.encoder_depth=1", "data.format=latents", "data.latent_cache=lat", "repa.teacher_cache=tc"]

# rule id -> (recipe, overrides that break the rule, world size for the rules checked at trainer start)
CROSS = {
    # REPA (repa.*)
    "repa.enabled+task+model.name": (TINY_DIT, REPA_OK + ["model.name=SiT-tiny/2-VAE-simple"], None),
    "model.learn_sigma+model.name": (TINY_DIT, REPA_OK + ["model.learn_sigma=true"], None),
    "repa.encoder_depth+model.name+repa.enabled": (TINY_DIT, REPA_OK + ["repa.encoder_depth=3"], None),
    "repa.teacher_path+repa.enabled": (TINY_DIT, REPA_OK + ["repa.teacher_path="], None),
    "repa.features+data.format+repa.teacher_cache+repa.enabled": (TINY_DIT, REPA_OK + ["repa.teacher_cache="], None),
    "repa.teacher+repa.teacher_input_size+data.image_size+model.img_size+model.name+repa.enabled":
        (TINY_DIT, REPA_OK + ["repa.teacher_input_size=112"], None),
    "model.name": (TINY, ["model.name=vit_nope_patch_vae"], None),
    "task+model.name": (TINY, ["task=dit"], None),
    "model.img_size+model.name": (TINY, ["model.img_size=9", "data.image_size=72"], None),
    "data.image_size+vae.version+model.img_size+data.format": (TINY, ["data.image_size=128"], None),
    "model.in_chans+vae.version+data.format": (TINY, ["model.in_chans=16"], None),
    "data.num_classes+model.num_classes+task": (TINY_DIT, ["data.num_classes=5"], None),
    "mask.ratio+model.img_size+model.name+task": (TINY, ["mask.ratio=0.99"], None),
    "model.norm_image+model.norm_pix_loss": (TINY, ["model.norm_image=true", "model.norm_pix_loss=false"], None),
    "data.root+data.format": (TINY, ["data.root="], None),
    "vae.path+data.format+eval.fid_every": (TINY, ["vae.path="], None),
    "data.latent_cache+data.format": (TINY, ["data.format=latents"], None),
    "optim.lr+optim.blr": (TINY, ["optim.lr=0", "optim.blr=0"], None),
    "optim.min_lr+optim.lr": (TINY, ["optim.lr=1e-4", "optim.min_lr=1e-3"], None),
    "schedule.epochs+schedule.max_steps": (TINY, ["schedule.epochs=0", "schedule.max_steps=0"], None),
    "schedule.warmup_steps+schedule.max_steps+schedule.warmup_epochs+schedule.epochs":
        (TINY, ["schedule.warmup_epochs=1000"], None),
    "engine.ddp_bf16_grads": (TINY, ["engine.ddp_bf16_grads=true"], None),
    "engine.precision+engine.reduce_dtype": (TINY, ["engine.precision=official", "engine.reduce_dtype=bf16"], None),
    "engine.fp8+engine.name": (TINY, ["engine.fp8=tensorwise", "engine.name=deepspeed"], None),
    "engine.fp8+engine.precision+task": (TINY, ["engine.fp8=rowwise", "engine.precision=official"], None),
    "engine.deepspeed_config+engine.name": (TINY, ["engine.deepspeed_config=ds.json"], None),
    "checkpoint.strict_keys": (TINY, ["checkpoint.strict_keys=task,modle.name"], None),
    "eval.fid_every+task": (TINY, ["eval.fid_every=10"], None),
    "eval.fid_reference+eval.fid_every": (TINY_DIT, ["eval.fid_every=10"], None),
    "eval.fid_samples+eval.fid_every": (TINY_DIT, ["eval.fid_every=10", "eval.fid_samples=1"], None),
    "eval.sampler+task+eval.fid_every": (TINY_DIT, ["eval.fid_every=10", "eval.sampler=sde"], None),
    "eval.cfg_channels+model.in_chans": (TINY, ["eval.cfg_channels=5"], None),
    "eval.cfg_scale+model.class_dropout_prob+eval.fid_every":
        (TINY_DIT, ["eval.fid_every=10", "eval.cfg_scale=4.0", "model.class_dropout_prob=0"], None),
    "engine.name@start": (TINY, [], 2),
    "engine.fsdp_shard_size+engine.name@start": (TINY, ["engine.name=fsdp2", "engine.fsdp_shard_size=3"], 4),
    "optim.min_lr+optim.blr+optim.lr+data.batch_size+schedule.accum_iter@start": (TINY, ["optim.min_lr=0.5"], 1),
    "data.global_batch_size@start": (TINY, ["data.global_batch_size=256"], 3),
    "data.global_batch_size+data.micro_batch_size@start":
        (TINY, ["data.global_batch_size=254", "data.micro_batch_size=100"], 1),
    # the tool launchers' own rules (their config: JobConfig plus their section, TOOL below)
    "vae.path+sample.out_dir": ("sample", ["vae.path="], None),
    "model.name+sample.out_dir": ("sample", ["model.name=vit_tiny_patch_vae"], None),
    "eval.sampler+model.name+sample.out_dir": ("sample", ["eval.sampler=sde"], None),
    "vae.path+cache.out": ("cache", ["vae.path="], None),
    "data.format+cache.out": ("cache", ["data.format=latents"], None),
    "data.root+cache.out": ("cache", ["data.root="], None),
}
# VA-VAE latents and LightningDiT (issue 21)
CROSS.update({
    "vae.latent_stats+vae.version+data.format+eval.fid_every": (TINY, ["vae.version=f16d32", "model.in_chans=32",
                                                                        "data.image_size=128"], None),
    "vae.latent_stats+vae.version+sample.out_dir": ("sample", ["vae.version=f16d32"], None),
    "vae.latent_stats+vae.scale": (TINY, ["vae.latent_stats=stats.json", "vae.scale=0.5"], None),
    "vae.latent_multiplier+vae.latent_stats": (TINY, ["vae.latent_multiplier=2.0"], None),
    "dit.time_sampling+dit.cosine_loss+task": (TINY_DIT, ["dit.cosine_loss=true"], None),
    "eval.timestep_shift+eval.sampler": (TINY_DIT, ["eval.timestep_shift=0.3"], None),
    "model.learn_sigma+model.name": (TINY_DIT, ["task=sit", "model.name=LightningDiT-tiny/1"], None),
})


def _violation(key: str, lo, hi, lo_open, hi_open):
    """A value just outside the range of ``key`` (an int below an int bound, a float otherwise)."""
    if lo is not None:
        v = lo if lo_open else lo - (1 if isinstance(lo, int) else 1e-3)
    else:
        v = hi if hi_open else hi + 1
    return v


# A valid config of each tool (launchers/*.py): (schema, sections, overrides); a case names one by its section.
TOOL = {
    "sample": (SampleJob, ("model", "vae", "data.image_size", "eval", "engine", "sample", "progress"),
               ["model.name=DiT-tiny/2", "vae.path=tiny-random", "sample.ckpt=x.pt", "sample.out_dir=out"]),
    "cache": (CacheJob, ("data", "vae", "seed", "progress", "cache"),
              ["data.root=data", "vae.path=tiny-random", "cache.out=out"]),
    "transfer": (TransferJob, ("task", "seed", "model", "dit.use_pretrain_layer", "transfer"),
                 ["task=dit", "model.name=DiT-tiny/2", "transfer.src=mae.pth", "transfer.out=dit.safetensors"]),
}


def _load(path, overrides, **kw):
    """load_config of a case: a recipe, or a tool's config (TOOL) with the case's overrides after its own."""
    if path in TOOL:
        schema, sections, base = TOOL[path]
        return load_config(None, base + list(overrides), schema=schema, sections=sections, **kw)
    return load_config(path, overrides, **kw)


def _recipe(key):
    tool = key.split(".")[0]
    return tool if tool in TOOL else TINY_DIT if key.startswith("eval.") else TINY


def _cases():
    out = dict(CROSS)
    for key, options in CHOICES.items():
        out[key] = (_recipe(key), [f"{key}=bogus"], None)
    for key, options in INT_CHOICES.items():
        out[key] = (_recipe(key), [f"{key}={max(options) + 1}"], None)
    for key, lo, hi, lo_open, hi_open, _ in RANGES:
        out[key] = (_recipe(key), [f"{key}={_violation(key, lo, hi, lo_open, hi_open)}"], None)
    for key in REQUIRED_STRINGS:
        out[key] = (TINY, [f"{key}="], None)
    return out


CASES = _cases()
BY_ID = {r.id: r for r in RULES}


def test_every_rule_has_a_case_and_ids_are_unique():
    ids = [r.id for r in RULES]
    assert len(ids) == len(set(ids))
    assert sorted(CASES) == sorted(ids)


@pytest.mark.parametrize("path", [TINY, TINY_DIT, *TOOL])
def test_bases_are_valid(path):
    cfg = _load(path, [])
    validate_runtime(cfg, 1)


def test_repa_base_is_valid():
    validate_runtime(_load(TINY_DIT, REPA_OK), 1)
    _load(TINY_DIT, [o for o in REPA_OK if not o.startswith(("data.", "repa.teacher_cache"))] +
          ["repa.features=online"])     # online: the images of the tiny recipe's folder


def test_a_tool_runs_only_the_rules_of_its_sections():
    """A tool's config loads with what the tool needs (the training rules of other sections stay silent), and the
    training config does not see the tools' rules."""
    schema, sections, base = TOOL["sample"]
    cfg = load_config(None, base, schema=schema, sections=sections)   # data.root empty, no output_dir checks
    assert cfg.data.root == "" and cfg.sample.out_dir == "out"
    with pytest.raises(ConfigError, match=r"required key 'sample.ckpt' is missing"):
        load_config(None, base[:2], schema=schema, sections=sections)
    load_config(TINY)  # no sample section, none of its rules


@pytest.mark.parametrize("rule_id", sorted(CASES))
def test_rule(rule_id):
    rule = BY_ID[rule_id]
    path, overrides, world = CASES[rule_id]
    cfg = _load(path, overrides, check_missing=False)
    args = (world,) if rule.runtime else ()
    assert rule.check(cfg, *args), f"{rule_id}: {overrides} does not break the rule"
    with pytest.raises(ConfigError) as e:
        if rule.runtime:
            _load(path, overrides)  # valid when it loads ...
            validate_runtime(cfg, world)  # ... refused at start-up
        else:
            _load(path, overrides)
    msg = str(e.value)
    for key in rule.keys:
        assert f"{key}=" in msg, (key, msg)
    for o in overrides:  # a key of the rule set on the command line is named with that source
        if o.split("=")[0] in rule.keys:
            assert f"{o.split('=')[0]}=" in msg and "(command line)" in msg, msg


def test_error_names_the_file_that_set_the_key(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text(f"_base_: {TINY}\noptim:\n  blr: -1.0e-3\n")
    with pytest.raises(ConfigError, match=r"optim\.blr=-0\.001 \(.*recipe\.yaml\): out of range"):
        load_config(str(p))


def test_issue_examples():
    """optim.blr=-1e-3 trained silently, mask.ratio=1.0 was accepted, data.batch_size=0/-4 crashed later, a negative
    optim.lr gave torch's error without the key: each is now refused at load, naming the key."""
    for ov, key in (("optim.blr=-1e-3", "optim.blr"), ("mask.ratio=1.0", "mask.ratio"),
                    ("data.batch_size=0", "data.batch_size"), ("data.batch_size=-4", "data.batch_size"),
                    ("optim.lr=-0.1", "optim.lr"), ("optim.blr=.nan", "optim.blr"),
                    ("data.image_size=60", "data.image_size")):
        with pytest.raises(ConfigError, match=rf"{key}=.*\(command line\)"):
            load_config(TINY, [ov])
    assert not math.isnan(load_config(TINY).optim.blr)


def test_several_broken_rules_are_reported_together():
    with pytest.raises(ConfigError, match="3 invalid config values") as e:
        load_config(TINY, ["optim.beta1=1.5", "data.num_workers=-1", "ema.decay=1.0"])
    assert all(k in str(e.value) for k in ("optim.beta1", "data.num_workers", "ema.decay"))


def test_patch_size_of_every_registered_model():
    from usp_scale.models import create_model, list_models

    for name in list_models():
        m = create_model(name, device="meta")
        emb = getattr(m, "patch_embed", None) or getattr(m, "x_embedder")
        p = emb.proj.kernel_size[0]
        assert model_patch_size(name) == p, name


def test_docs_table_is_the_rule_list():
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        assert rules_table() in f.read()


def test_removed_key_says_what_replaced_it():
    with pytest.raises(ConfigError, match=r"model\.cfg_official_channels' was removed: .*eval\.cfg_channels=3"):
        load_config(TINY_DIT, ["model.cfg_official_channels=true"])


def test_validate_uses_origins_attached_by_load():
    cfg = load_config(TINY, ["seed=3"])
    assert cfg._origins["seed"] == "command line" and cfg._origins["model.name"].endswith("tiny.yaml")
    cfg.seed = -1
    with pytest.raises(ConfigError, match=r"seed=-1 \(command line\)"):
        validate(cfg)
