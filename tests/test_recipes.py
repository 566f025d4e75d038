"""The paper recipes, resolved as the trainer resolves them, against a table of the official values; the start-up
batch/precision rules; the gradient-reduction dtype of each engine; the same global batch on 1, 2 and 4 ranks."""
import json
import os

import pytest
import torch

import _helpers_train as H
from usp_scale.config import ConfigError, EngineConfig, load_config
from usp_scale.data.build import resolve_loader_backend
from usp_scale.data.transforms import RANDAUG_FILL, OneDrawRandomResizedCrop, build_transform
from usp_scale.training.schedule import absolute_lr
from usp_scale.config.resolve import plan_batch, resolve_job
from usp_scale.config.schema import OFFICIAL_PRECISION
from usp_scale.config.validate import repa_teacher_input

ROOT = H.REPO


def resolved(recipe: str, world: int = 8, *overrides):
    cfg = load_config(os.path.join(ROOT, "configs", recipe), list(overrides))
    plan = resolve_job(cfg, world)
    return cfg, plan


# The official code's values (docs/method.md §2, §4, §6; the comparison). Each row: recipe, dotted key, value.
# "lr@G" is the absolute learning rate at the global batch, "backend" the image loader data.loader resolves to.
PRETRAIN = {
    "task": "pretrain", "data.format": "folder", "data.augment": "pretrain", "data.crop_scale_min": 0.2,
    "data.image_size": 224, "backend": "torchvision", "vae.version": "d8", "vae.posterior": "mean",
    "vae.dtype": "fp16", "vae.autocast": True, "vae.scale": 0.0, "model.img_size": 28, "model.in_chans": 4,
    "model.norm_pix_loss": True, "mask.ratio": 0.75, "mask.add_noise": False, "optim.name": "adamw",
    "optim.blr": 1.5e-4, "optim.weight_decay": 0.05, "optim.beta1": 0.9, "optim.beta2": 0.95, "optim.eps": 1e-8,
    "optim.min_lr": 0.0, "optim.clip_grad": 0.0, "schedule.name": "cosine", "schedule.epochs": 800,
    "schedule.warmup_epochs": 40.0, "global_batch": 4096, "lr@G": 2.4e-3, "engine.precision": "fp16",
    "engine.tf32": False, "engine.reduce_dtype": "fp32",
}
DIT = {
    "data.format": "folder", "data.augment": "adm", "data.image_size": 256, "backend": "torchvision",
    "vae.posterior": "sample", "vae.dtype": "fp32", "vae.autocast": False, "model.img_size": 32,
    "model.learn_sigma": True, "model.class_dropout_prob": 0.1, "optim.name": "adamw", "optim.lr": 1e-4,
    "optim.weight_decay": 0.0, "optim.beta1": 0.9, "optim.beta2": 0.999, "optim.clip_grad": 0.0,
    "schedule.name": "constant", "schedule.max_steps": 400000, "schedule.warmup_steps": 0, "ema.decay": 0.9999,
    "global_batch": 256, "lr@G": 1e-4, "engine.precision": "fp32", "engine.tf32": True, "engine.reduce_dtype": "fp32",
}
CLS = {
    "task": "cls", "data.augment": "finetune", "backend": "torchvision", "vae.posterior": "mean", "vae.dtype": "fp16",
    "vae.autocast": True, "model.global_pool": "avg", "model.drop_path_rate": 0.1, "optim.name": "adamw",
    "optim.blr": 1e-3, "optim.min_lr": 1e-6, "optim.weight_decay": 0.05, "optim.beta2": 0.999,
    "optim.layer_decay": 0.75, "schedule.epochs": 50, "schedule.warmup_epochs": 5.0, "cls.smoothing": 0.1,
    "global_batch": 1024, "engine.precision": "fp16", "engine.reduce_dtype": "fp32",
}
LINPROBE = {
    "task": "linprobe", "data.augment": "linprobe", "backend": "torchvision", "vae.posterior": "mean",
    "model.global_pool": "token", "optim.name": "lars", "optim.blr": 0.1, "optim.weight_decay": 0.0,
    "optim.min_lr": 0.0, "optim.momentum": 0.9, "optim.trust_coefficient": 0.001, "schedule.epochs": 90,
    "schedule.warmup_epochs": 10.0, "cls.smoothing": 0.0, "global_batch": 16384, "lr@G": 6.4,
    "engine.precision": "fp16", "engine.reduce_dtype": "fp32",
}
TABLE = [(f"pretrain/usp_{s}_224.yaml", PRETRAIN) for s in ("base", "large", "xlarge")] + \
    [(f"finetune/{m}_{s}_256.yaml", {**DIT, "task": m}) for m in ("dit", "sit") for s in ("b", "l", "xl")] + \
    [(f"finetune/vit_{s}_finetune.yaml", CLS) for s in ("base", "large", "xlarge")] + \
    [(f"finetune/vit_{s}_linprobe.yaml", LINPROBE) for s in ("base", "large", "xlarge")]


# REPA (docs/method.md §9): REPA's train.py defaults for REPA alone (its SiT, VAE ft-mse, fp16 + TF32, clipping 1.0);
# USP + REPA: the USP SiT recipe with REPA's projector, loss and clipping.
REPA = {"repa.enabled": True, "repa.encoder_depth": 8, "repa.proj_coeff": 0.5, "repa.teacher": "dinov2_vitb14",
        "repa.projector_dim": 2048, "optim.clip_grad": 1.0, "teacher_input": 224}
REPA_TABLE = [("finetune/sit_xl_256_repa.yaml", {**DIT, **REPA, "task": "sit", "model.name": "SiT-XL/2-REPA",
                                                 "model.learn_sigma": False, "vae.path": "weights/sd-vae-ft-mse",
                                                 "engine.precision": "fp16", "engine.tf32": True,
                                                 "checkpoint.init_from": ""}),
              ("finetune/sit_xl_256_usp_repa.yaml", {**DIT, **REPA, "task": "sit",
                                                     "model.name": "SiT-XL/2-VAE-simple-REPA",
                                                     "vae.path": "weights/sd-vae-ft-ema"})]
TABLE += REPA_TABLE


def value(cfg, plan, key):
    if key == "global_batch":
        return plan.global_batch
    if key == "lr@G":
        return absolute_lr(cfg.optim, plan.global_batch)
    if key == "backend":
        return resolve_loader_backend(cfg.data.loader, cfg.data.augment)
    if key == "teacher_input":
        return repa_teacher_input(cfg)
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("recipe,official", TABLE, ids=[r for r, _ in TABLE])
def test_paper_recipe_resolves_to_the_official_values(recipe, official):
    cfg, plan = resolved(recipe, 8)

    def same(ours, want):
        return ours == pytest.approx(want) if isinstance(want, float) else ours == want

    wrong = {k: (value(cfg, plan, k), v) for k, v in official.items() if not same(value(cfg, plan, k), v)}
    assert not wrong, f"{recipe}: (ours, official) {wrong}"


def test_paper_input_transforms_are_the_official_ones():
    pre = build_transform("pretrain", 224, 0.2).transforms
    assert (pre[0].size, pre[0].scale, pre[0].ratio) == ((224, 224), (0.2, 1.0), (3 / 4, 4 / 3))
    assert pre[0].interpolation.value == "bicubic" and pre[1].p == 0.5 and len(pre) == 3
    lp = build_transform("linprobe", 224).transforms
    assert isinstance(lp[0], OneDrawRandomResizedCrop) and lp[0].scale == (0.08, 1.0) and lp[1].p == 0.5
    assert lp[0].interpolation.value == "bicubic" and len(lp) == 3      # no RandAugment, no RandomErasing
    from timm.data.auto_augment import RandAugment
    ft = build_transform("finetune", 224)
    ra = [t for t in ft.transforms if isinstance(t, RandAugment)][0]
    assert RANDAUG_FILL == (124, 116, 104) and all(op.kwargs["fillcolor"] == RANDAUG_FILL for op in ra.ops)
    norm = [t for t in ft.transforms if type(t).__name__ == "Normalize"][0]
    assert norm.mean.tolist() == [0.5] * 3 and norm.std.tolist() == [0.5] * 3


def test_fast_recipes_are_the_paper_recipe_on_a_latent_cache_in_bf16():
    for s in ("base", "large", "xlarge"):
        paper, _ = resolved(f"pretrain/usp_{s}_224.yaml")
        fast, _ = resolved(f"pretrain/usp_{s}_224_fast.yaml")
        assert (fast.data.format, fast.engine.precision, fast.engine.reduce_dtype) == ("latents", "bf16", "fp32")
        assert fast.data.latent_sample is False and fast.model == paper.model and fast.optim == paper.optim
        assert fast.schedule == paper.schedule and fast.data.global_batch_size == paper.data.global_batch_size


@pytest.mark.parametrize("world", [1, 2, 4, 8, 64])
def test_global_batch_and_lr_do_not_depend_on_the_world_size(world):
    for recipe, g, lr in (("pretrain/usp_xlarge_224.yaml", 4096, 2.4e-3), ("finetune/dit_xl_256.yaml", 256, 1e-4),
                          ("finetune/vit_large_linprobe.yaml", 16384, 6.4)):
        cfg, plan = resolved(recipe, world)
        assert plan.global_batch == g == cfg.data.batch_size * cfg.schedule.accum_iter * world
        assert cfg.data.batch_size <= cfg.data.micro_batch_size
        assert absolute_lr(cfg.optim, plan.global_batch) == pytest.approx(lr)


def test_batch_plan_splits_and_errors_name_the_keys():
    cfg = load_config(None, ["model.name=x", "data.global_batch_size=256", "data.micro_batch_size=48"],
                      check_missing=False)
    p = plan_batch(cfg.data, cfg.schedule, 2)       # 128 per rank, largest divisor <= 48 is 32
    assert (p.micro_batch, p.accum_iter, p.per_rank) == (32, 4, 128)
    assert plan_batch(cfg.data, cfg.schedule, 8).accum_iter == 1            # 32 per rank fits
    with pytest.raises(ConfigError, match=r"data.global_batch_size=256 .*do not divide over 3 ranks"):
        resolve_job(cfg, 3)
    cfg.data.global_batch_size, cfg.data.micro_batch_size = 254, 100         # 254 = 2 x 127
    with pytest.raises(ConfigError, match=r"data.micro_batch_size=100 .*per-rank batch 254 .*127"):
        resolve_job(cfg, 1)
    off = load_config(None, ["model.name=x", "data.batch_size=8", "schedule.accum_iter=2"], check_missing=False)
    p = plan_batch(off.data, off.schedule, 4)
    assert (p.global_batch, p.derived) == (64, False)


def test_startup_writes_the_plan_and_warns_about_replaced_values():
    cfg = load_config(None, ["model.name=x", "data.global_batch_size=64", "data.batch_size=8", "engine.name=ddp"],
                      check_missing=False)
    with pytest.warns(UserWarning, match=r"data.batch_size=8 replaced by 16.*data.micro_batch_size"):
        resolve_job(cfg, 4)
    assert (cfg.data.batch_size, cfg.schedule.accum_iter) == (16, 1)


@pytest.mark.parametrize("task", sorted(OFFICIAL_PRECISION))
def test_official_precision_is_one_key(task):
    cfg = load_config(None, ["model.name=x", f"task={task}", "engine.precision=official"], check_missing=False)
    resolve_job(cfg, 1)
    want = {"pretrain": ("fp16", False), "cls": ("fp16", False), "linprobe": ("fp16", False),
            "dit": ("fp32", True), "sit": ("fp32", True)}[task]
    assert (cfg.engine.precision, cfg.engine.tf32, cfg.engine.reduce_dtype) == (*want, "fp32")


def test_precision_conflicts_are_errors():
    """Each refused when the config loads (the one place: usp_scale.config.validate), naming the keys."""
    tiny = os.path.join(ROOT, "configs", "debug", "tiny.yaml")
    with pytest.raises(ConfigError, match="engine.precision=official reduces gradients in fp32"):
        load_config(tiny, ["engine.precision=official", "engine.reduce_dtype=bf16"])
    with pytest.raises(ConfigError, match="set engine.reduce_dtype=bf16"):
        load_config(tiny, ["engine.ddp_bf16_grads=true"])
    with pytest.raises(ConfigError, match="engine.reduce_dtype='fp16'"):
        load_config(tiny, ["engine.reduce_dtype=fp16"])


def _sgd(m):
    return torch.optim.SGD(m.parameters(), 0.1)


@pytest.fixture
def one_rank_group():
    """The engines make a 1-rank gloo group in this process (and set MASTER_PORT etc.): tear both down afterwards,
    so later tests in the worker (launches of subprocesses that read MASTER_PORT) do not inherit them."""
    import torch.distributed as dist
    saved = dict(os.environ)
    H.init_group()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def test_gradient_reduction_dtype_per_engine(one_rank_group):
    """fp32 by default: DDP without a compression hook, FSDP2 reduce_dtype fp32, DeepSpeed communication fp32;
    bf16 on request."""
    from usp_scale.engine import build_engine

    for dtype in ("fp32", "bf16"):
        ddp = build_engine(EngineConfig(name="ddp", precision="fp32", reduce_dtype=dtype), H.engine_model(), _sgd)
        hooks = [h.__name__ for h, _ in ddp.model._comm_hooks]
        assert hooks == ([] if dtype == "fp32" else ["bf16_compress_hook"])
        fsdp = build_engine(EngineConfig(name="fsdp2", precision="bf16", reduce_dtype=dtype), H.engine_model(), _sgd)
        want = torch.float32 if dtype == "fp32" else torch.bfloat16
        assert fsdp.model._get_fsdp_state()._mp_policy.reduce_dtype == want
    assert EngineConfig().reduce_dtype == "fp32"


@pytest.mark.slow
def test_deepspeed_reduces_in_the_configured_dtype(one_rank_group):
    from usp_scale.engine import build_engine

    for dtype, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        eng = build_engine(EngineConfig(name="deepspeed", precision="bf16", zero_stage=2, reduce_dtype=dtype),
                           H.engine_model(), _sgd, micro_batch=2)
        assert eng.state.config["communication_data_type"] == dtype and eng.model.communication_data_type == want


@pytest.mark.slow
def test_same_global_batch_gives_the_same_training_on_1_2_and_4_ranks(tmp_path):
    """The classifier on synthetic latents (deterministic loss: no dropout, no mixup) with data.global_batch_size=16:
    1 rank x 16, 2 x 8, 4 x 4, and 1 rank x 4 micro-steps of 4 see the same samples in every optimizer step
    (the sampler's epoch permutation is cut into consecutive global batches), so the losses and lr agree."""
    runs = {}
    for name, nproc, extra in (("w1", 1, []), ("w2", 2, []), ("w4", 4, []), ("w1_accum", 1, ["data.micro_batch_size=4"])):
        out = tmp_path / name
        p = H.torchrun(["tests/_helpers_batch.py", "--out", str(out), *extra], nproc=nproc, timeout=600)
        assert p.returncode == 0 and p.stdout.count(H.OK) == nproc, p.stdout[-3000:] + p.stderr[-3000:]
        with open(out / "metrics.jsonl") as f:
            recs = [json.loads(x) for x in f if '"kind": "train"' in x]
        runs[name] = recs
        with open(out / "plan.json") as f:
            plan = json.load(f)
        assert plan["global_batch"] == 16 and plan["world_size"] == nproc
    assert json.load(open(tmp_path / "w1_accum" / "plan.json"))["accum_iter"] == 4
    ref = runs["w1"]
    assert len(ref) == 8
    for name, recs in runs.items():
        assert [r["step"] for r in recs] == [r["step"] for r in ref]
        assert [r["lr"] for r in recs] == pytest.approx([r["lr"] for r in ref], rel=1e-12)
        assert [r["loss"] for r in recs] == pytest.approx([r["loss"] for r in ref], rel=1e-5, abs=1e-6), name
