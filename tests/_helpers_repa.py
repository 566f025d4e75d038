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
        ov += ["data.format=latents", f"data.latent_cache={d['latents']}", f"repa.teacher_cache={d['teacher_cache']}"]
    else:
        ov += ["data.format=folder", f"data.root={d['images']}"]
    return ov


def repa_cfg(d: dict, out: str, *extra, model: str = "SiT-tiny/2-REPA", features: str = "cache"):
    from usp_scale.config import load_config

    return load_config(os.path.join(REPO, "configs", "debug", "tiny_dit.yaml"),
                       repa_overrides(d, model, features) + [f"output_dir={out}", *extra])
