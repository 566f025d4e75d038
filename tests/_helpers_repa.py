"""Helpers of the REPA training tests: a small synthetic dataset, its latent cache (tiny-random VAE, 64 px ADM crops,
plain + flipped), a seeded random ``dinov2_tiny_test`` teacher written in the official torch.hub format, the
teacher-feature cache beside the latent cache, and the config overrides of a tiny REPA run on them."""
from __future__ import annotations

import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_hub_teacher(path: str, seed: int = 0, name: str = "dinov2_tiny_test") -> str:
    """A random teacher of ``name`` at the checkpoint's 37 x 37 grid, saved as torch.hub's bare state dict (with
    ``mask_token``): what ``usp_scale.transfer.teachers.load_teacher`` reads."""
    from usp_scale.models.teacher import TEACHERS, DINOv2ViT

    torch.manual_seed(seed)
    net = DINOv2ViT(TEACHERS[name], grid=37)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    sd = dict(net.state_dict())
    sd["mask_token"] = torch.zeros(1, TEACHERS[name].embed_dim)
    torch.save(sd, path)
    return path


def make_repa_data(root: str, *, classes: int = 4, per_class: int = 12, views: int = 1) -> dict:
    """Images, latent cache, teacher weights and teacher cache under ``root``; returns their paths."""
    from usp_scale.data import build_dataset, write_cache, write_manifest
    from usp_scale.data.synthetic import make_synthetic
    from usp_scale.data.teacher_cache import write_teacher_cache, write_teacher_manifest
    from usp_scale.transfer.teachers import load_teacher
    from usp_scale.vae import FrozenVAE

    data = os.path.join(root, "images")
    make_synthetic(data, classes=classes, per_class=per_class, size=64, val_per_class=0, seed=1)
    ds = build_dataset(data, "train")
    lat = os.path.join(root, "latents")
    write_cache(ds, FrozenVAE("tiny-random"), lat, image_size=64, augment="adm", views=views, seed=3, dtype="fp16",
                shard_size=20, batch_size=16, progress=False)
    write_manifest(lat)
    teacher_path = write_hub_teacher(os.path.join(root, "teacher.pth"))
    teacher = load_teacher(teacher_path, name="dinov2_tiny_test", image_size=64, input_size=56)
    tc = os.path.join(root, "teacher_cache")
    write_teacher_cache(ds, teacher, tc, lat, batch_size=16, progress=False)
    write_teacher_manifest(tc)
    return {"images": data, "latents": lat, "teacher": teacher_path, "teacher_cache": tc, "classes": classes}


def repa_overrides(d: dict, model: str = "SiT-tiny/2-REPA", features: str = "cache") -> list:
    """Overrides of configs/debug/tiny_dit.yaml for a tiny REPA run on :func:`make_repa_data`'s files."""
    task = "dit" if model.startswith("DiT") else "sit"
    ov = [f"task={task}", f"model.name={model}", f"model.num_classes={d['classes']}",
          f"data.num_classes={d['classes']}", "vae.path=tiny-random", "checkpoint.init_from=", "eval.fid_every=0",
          "repa.enabled=true", "repa.teacher=dinov2_tiny_test", f"repa.teacher_path={d['teacher']}",
          "repa.teacher_input_size=56", "repa.encoder_depth=1", "repa.projector_dim=64", f"repa.features={features}",
          "progress=false", "plot=false", "tensorboard=false", "log_every=1", "optim.fused=false"]
    if model.startswith("SiT-") and model.endswith("/2-REPA"):
        ov.append("model.learn_sigma=false")
    if features == "cache":
        ov += ["data.format=latents", f"data.latent_cache={d['latents']}", f"repa.teacher_cache={d['teacher_cache']}",
               "data.augment=adm"]   # the cache's augmentation (a job on a cache must name it)
    else:
        ov += ["data.format=folder", f"data.root={d['images']}"]
    return ov


def repa_cfg(d: dict, out: str, *extra, model: str = "SiT-tiny/2-REPA", features: str = "cache"):
    from usp_scale.config import load_config

    return load_config(os.path.join(REPO, "configs", "debug", "tiny_dit.yaml"),
                       repa_overrides(d, model, features) + [f"output_dir={out}", *extra])


# ---------------------------------------------------------------------------------------- engine equivalence

def repa_job():
    """The config of a tiny REPA SiT job (REPA's SiT-tiny/2-REPA, the tiny teacher's 4x4 grid of 64-wide tokens)."""
    from usp_scale.config import JobConfig

    cfg = JobConfig()
    cfg.task, cfg.model.name, cfg.model.learn_sigma, cfg.model.num_classes = "sit", "SiT-tiny/2-REPA", False, 10
    cfg.model.img_size, cfg.data.image_size, cfg.data.num_classes = 8, 64, 10
    r = cfg.repa
    r.enabled, r.teacher, r.teacher_input_size, r.encoder_depth, r.projector_dim = \
        True, "dinov2_tiny_test", 56, 1, 64
    return cfg


def online_teacher():
    """A seeded random ``dinov2_tiny_test`` teacher for 64 px pictures (56 px input, 16 tokens of 64), frozen: every
    rank builds the same one, as every rank loads the teacher file whole."""
    from usp_scale.models.teacher import TEACHERS, DINOv2ViT, FrozenTeacher

    g = torch.Generator().manual_seed(5)
    net = DINOv2ViT(TEACHERS["dinov2_tiny_test"], grid=4)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return FrozenTeacher(net, name="dinov2_tiny_test", image_size=64)


def repa_engine_losses(engine_cfg, *, steps=3, accum=2, global_batch=8, rank=0, world=1, clip=1.0, online=False):
    """The REPA task's loss pieces (its transport, its projection capture and total) under ``engine_cfg`` with the
    task's random draws (t, noise, dropped labels) fixed per sample, so that the global mean is the same for any
    split of the batch over ranks; returns per-step global losses and the final full weights. ``online``: the
    teacher tokens come from the frozen teacher run on each rank's own pictures (repa.features=online) instead of
    fixed cached tokens."""
    import torch.distributed as dist

    from usp_scale.config import OptimConfig
    from usp_scale.engine import build_engine
    from usp_scale.training import build_task
    from usp_scale.training.optim import build_optimizer, param_groups

    job = repa_job()
    if online:
        job.repa.features = "online"
    task = build_task(job)
    if online:
        task.repa.teacher = online_teacher()
    torch.manual_seed(0)
    model = task.build_model()
    ocfg = OptimConfig(lr=1e-3, weight_decay=0.0, eps=1e-4, fused=False)
    per = global_batch // world
    eng = build_engine(engine_cfg, model, lambda m: build_optimizer(ocfg, param_groups(m, 0.0), torch.device("cpu")),
                       accum_iter=accum, clip_grad=clip, micro_batch=per)
    g = torch.Generator().manual_seed(11)
    m = steps * accum
    x = torch.randn(m, global_batch, 4, 8, 8, generator=g)
    y = torch.randint(0, 10, (m, global_batch), generator=g)
    tok = torch.randn(m, global_batch, 16, 64, generator=g).to(torch.bfloat16)
    t = torch.rand(m, global_batch, generator=g)
    noise = torch.randn(m, global_batch, 4, 8, 8, generator=g)
    drop = (torch.rand(m, global_batch, generator=g) < 0.1).long()
    # the crops in [-1, 1] the online teacher reads (whole uint8 levels, as the loader's)
    img = torch.randint(0, 256, (m, global_batch, 3, 64, 64), generator=g).float() / 127.5 - 1 if online else None
    losses, acc = [], 0.0
    for i in range(m):
        s = slice(rank * per, (rank + 1) * per)
        with eng.sync_context(), eng.autocast():
            cap = task.repa.capture(eng)
            diff = task.transport.training_losses(cap, x[i, s], {"y": y[i, s], "force_drop_ids": drop[i, s]},
                                                  t=t[i, s], noise=noise[i, s])["loss"].mean()
            loss = task.repa.total(diff, cap, {"images": img[i, s]} if online else {"teacher_tokens": tok[i, s]})
        eng.backward(loss)
        acc += float(loss.detach()) / accum
        if eng.step() is None:
            continue
        v = torch.tensor([acc], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(v)
        losses.append(float(v) / world)
        acc = 0.0
    sd = eng.weights.full_model_state_dict()
    return losses, {k: v.tolist() for k, v in sd.items()}


REPA_CASES = {"ddp": dict(name="ddp"), "fsdp2": dict(name="fsdp2"), "ddp_online": dict(name="ddp", online=True),
              "ds1": dict(name="deepspeed", zero_stage=1),
              "ds2": dict(name="deepspeed", zero_stage=2), "ds3": dict(name="deepspeed", zero_stage=3)}


def worker_repa_equiv(out: str, cases: list) -> None:
    import _helpers_train as H

    info = H.init_group()
    results = {}
    for case in cases:
        kw = dict(REPA_CASES[case])
        online = kw.pop("online", False)
        losses, sd = repa_engine_losses(H.engine_cfg(kw.pop("name"), **kw), rank=info.rank, world=info.world_size,
                                        online=online)
        results[case] = {"losses": losses, "state": sd}
    H.finish(out, "repa_equiv.json", results, info.rank)


if __name__ == "__main__":
    import argparse
    import sys

    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", nargs="*", default=["ddp", "fsdp2"])
    ap.add_argument("--local_rank", type=int, default=-1)
    a = ap.parse_args()
    worker_repa_equiv(a.out, a.cases)
    sys.stdout.flush()
