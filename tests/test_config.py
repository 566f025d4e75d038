import glob
import os
import re

import pytest
import yaml

from usp_scale.config import ConfigError, JobConfig, format_help, load_config, save_config
from usp_scale.config.load import field_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
                 if not os.path.basename(p).startswith("_"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_recipe_loads_and_names_a_registered_model(path):
    from usp_scale.models import list_models, model_family

    cfg = load_config(path)
    assert cfg.model.name in list_models()
    family = model_family(cfg.model.name)
    want = {"pretrain": "mae", "dit": "dit", "sit": "sit", "cls": "vit", "linprobe": "vit"}[cfg.task]
    assert family == want or (cfg.task, family) == ("sit", "lightningdit")  # task=sit also trains LightningDiT


def test_paper_numbers_in_recipes():
    xl = load_config(os.path.join(ROOT, "configs/pretrain/usp_xlarge_224.yaml"))
    assert (xl.optim.blr, xl.optim.beta2, xl.optim.weight_decay, xl.mask.ratio) == (1.5e-4, 0.95, 0.05, 0.75)
    assert (xl.schedule.epochs, xl.schedule.warmup_epochs, xl.model.img_size) == (800, 40, 28)
    dit = load_config(os.path.join(ROOT, "configs/finetune/dit_xl_256.yaml"))
    assert (dit.task, dit.model.name, dit.optim.lr, dit.optim.weight_decay, dit.ema.decay) == \
        ("dit", "DiT-XL/2-VAE-simple", 1e-4, 0.0, 0.9999)
    assert dit.schedule.max_steps == 400000 and dit.model.img_size == 32
    lp = load_config(os.path.join(ROOT, "configs/finetune/vit_large_linprobe.yaml"))
    assert (lp.task, lp.optim.name, lp.optim.blr, lp.model.global_pool, lp.data.global_batch_size) == \
        ("linprobe", "lars", 0.1, "token", 16384)


def test_dotted_overrides_and_types(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs/debug/tiny.yaml"),
                      ["model.name=vit_large_patch_vae", "optim.blr=1.5e-4", "optim.lr=1e-3", "data.batch_size=8",
                       "engine.compile=true", "seed=3"])
    assert cfg.model.name == "vit_large_patch_vae" and cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 8 and cfg.engine.compile is True and cfg.seed == 3


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  name: DiT-B/2\n  nmae: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'model\.nmae'"):
        load_config(str(p))
    with pytest.raises(ConfigError, match=r"command line: unknown key 'optim\.bl'"):
        load_config(None, ["model.name=x", "optim.bl=1"])


def test_wrong_type_and_missing_required(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("model:\n  name: DiT-B/2\ndata:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: key 'data\.batch_size' expects an integer, got 'lots'"):
        load_config(str(p))
    q = tmp_path / "m.yaml"
    q.write_text("task: dit\n")
    with pytest.raises(ConfigError, match=r"required key 'model\.name' is missing .*m\.yaml"):
        load_config(str(q))
    with pytest.raises(ConfigError, match="expects true/false"):
        load_config(None, ["model.name=a", "engine.compile=3"])


def test_base_inheritance_and_resolved_round_trip(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 5\ntask: dit\ndata:\n  root: data\n  image_size: 256\nvae:\n  path: tiny-random\n"
                                        "model:\n  name: DiT-S/2\n  img_size: 16\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nmodel:\n  img_size: 32\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.seed, cfg.model.name, cfg.model.img_size) == (5, "DiT-S/2", 32)
    out = save_config(cfg, str(tmp_path / "run" / "config.yaml"))
    again = load_config(out)
    assert again == cfg
    assert yaml.safe_load(open(out))["model"]["img_size"] == 32


def test_every_field_has_help():
    docs = field_docs()
    text = format_help(JobConfig())
    assert "optim.blr" in text and "Base learning rate" in text
    undocumented = [k for k, v in docs.items() if not v]
    assert not undocumented, f"fields without a help comment: {undocumented}"
    assert "model.name" in docs and "engine.zero_stage" in docs


@pytest.mark.parametrize("old,new,value", [("smoothing", "cls.smoothing", 0.2), ("mixup", "cls.mixup", 0.8),
                                           ("cutmix", "cls.cutmix", 1.0),
                                           ("use_pretrain_layer", "dit.use_pretrain_layer", 4)])
def test_task_fields_live_under_their_task_and_the_old_key_names_the_new_one(tmp_path, old, new, value):
    with pytest.raises(ConfigError, match=rf"key '{old}' moved to '{re.escape(new)}'"):
        load_config(overrides=["model.name=vit_tiny_patch_vae", f"{old}={value}"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: vit_tiny_patch_vae}}\n{old}: {value}\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(recipe))}: key '{old}' moved to '{re.escape(new)}'"):
        load_config(str(recipe))
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "debug",
                        "tiny_linprobe.yaml")
    assert load_config(tiny).cls.smoothing == 0.0  # the shipped recipes use the sections
    cfg = load_config(tiny, [f"{new}={value}"])
    section, name = new.split(".")
    assert getattr(getattr(cfg, section), name) == value


def test_choices_are_declared_by_the_schema_and_listed_in_the_help():
    import dataclasses

    from usp_scale.config.schema import EngineConfig
    from usp_scale.config.validate import CHOICES, INT_CHOICES, schema_choices

    prec = {f.name: f for f in dataclasses.fields(EngineConfig)}["precision"]
    assert prec.metadata["choices"] == CHOICES["engine.precision"] and "official" in CHOICES["engine.precision"]
    # the rules cover the choice fields of the job and of the tools' own sections (sample, cache, transfer)
    from usp_scale.config.schema import CacheJob, SampleJob, TransferJob

    every = {k for schema in (JobConfig, SampleJob, CacheJob, TransferJob) for k in schema_choices(schema)}
    assert INT_CHOICES == {"engine.zero_stage": (1, 2, 3)} and every == {*CHOICES, *INT_CHOICES}
    docs = field_docs()
    assert docs["engine.precision"].endswith("[one of: official, auto, fp32, bf16, fp16]")
    assert "[one of: 1, 2, 3]" in format_help(JobConfig()).split("engine.zero_stage", 1)[1].splitlines()[0]
    with pytest.raises(ConfigError, match=r"engine\.precision is one of official, auto, fp32, bf16, fp16"):
        load_config(overrides=["model.name=vit_tiny_patch_vae", "data.format=synthetic", "engine.precision=fp64"])


def test_duplicate_keys_and_repeated_sections_are_refused_naming_file_and_line(tmp_path):
    """PyYAML keeps the last of two equal keys silently; a recipe that repeats a key or a section is refused."""
    p = tmp_path / "dup_key.yaml"
    p.write_text("model:\n  name: DiT-B/2\noptim:\n  blr: 1.0e-4\n  blr: 2.0e-4\n")
    with pytest.raises(ConfigError, match=r"dup_key\.yaml: line 5: key 'blr' is written twice .*first on line 4"):
        load_config(str(p), check_missing=False)
    p = tmp_path / "dup_section.yaml"
    p.write_text("data:\n  root: /a\nmodel:\n  name: DiT-B/2\ndata:\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"dup_section\.yaml: line 5: key 'data' is written twice .*first on line 1"):
        load_config(str(p), check_missing=False)
    # a base that sets a key and a recipe that overrides it is still fine (different files)
    base = tmp_path / "base.yaml"
    base.write_text("optim:\n  blr: 1.0e-4\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\noptim:\n  blr: 2.0e-4\n")
    assert load_config(str(child), check_missing=False).optim.blr == 2.0e-4
