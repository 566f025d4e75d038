"""REPA as a training task (usp_scale/training/repa.py): task=sit/dit with repa.enabled on a *-REPA model.

A tiny end-to-end run on the CPU (latent cache + teacher-feature cache, the local engine) where the projection loss
falls; the task's total loss against a readable reference written in REPA's own convention (t = 0 data, v = eps - x,
-cos in fp32, proj_coeff); the teacher outside the model, the optimizer and the checkpoint; exact resume; the online
teacher mode; the refusals (another teacher's cache, a missing teacher file, a wrong token grid)."""
import glob
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_repa as R  # noqa: E402
import _helpers_train as H  # noqa: E402

from usp_scale.config import ConfigError  # noqa: E402
from usp_scale.training import Trainer, build_task, run  # noqa: E402


@pytest.fixture(scope="module")
def repa_data(tmp_path_factory):
    return R.make_repa_data(str(tmp_path_factory.mktemp("repa")))


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"kind": "train"' in line]


def test_tiny_repa_run_projection_loss_falls(repa_data, tmp_path):
    """REPA's SiT on cached latents and cached teacher tokens: the alignment loss falls, every record logs it; the
    teacher is nowhere in the model, the optimizer, the checkpoint or the exports."""
    out = str(tmp_path / "run")
    cfg = R.repa_cfg(repa_data, out, "schedule.max_steps=24", "data.batch_size=8", "optim.lr=1e-3",
                     "checkpoint.every_steps=0")
    trainer = Trainer(cfg)
    try:
        model = trainer.engine.unwrapped
        assert type(trainer.task).__name__ == "REPASiTTask" and model.time_reversed
        assert model.encoder_depth == 1 and model.z_dims == (64,) and model.projector_dim == 64
        opt_params = {id(p) for g in trainer.engine.param_groups for p in g["params"]}
        assert opt_params == {id(p) for p in model.parameters() if p.requires_grad}
        assert trainer.task.repa.teacher is None   # cache mode: the teacher was only fingerprinted
        assert "teacher_tokens" in next(iter(trainer.loader))
        # FLOPs: the student's 3 x forward (projector included), no teacher in cache mode
        assert trainer.train_flops == 3 * model.flops_per_sample()
        res = trainer.fit()
    finally:
        trainer.close()
    recs = _records(out)
    assert len(recs) == 24 and all("proj_loss" in r for r in recs)
    proj = [r["proj_loss"] for r in recs]
    assert all(-1.0 <= p <= 1.0 for p in proj)
    first, last = sum(proj[:4]) / 4, sum(proj[-4:]) / 4
    assert last < first - 0.2, proj           # the projector aligns with the teacher's tokens
    sd = torch.load(glob.glob(os.path.join(out, "export", "*.pt"))[0], weights_only=False)
    keys = set(sd["model"])
    assert keys == set(model.state_dict()) and any(k.startswith("projectors.") for k in keys)
    assert not any(k.startswith(("teacher", "net.")) for k in keys)
    assert res["step"] == 24


def _reference_repa_sit_loss(model, x, y, drop, t_ours, noise, tokens, coeff):
    """REPA's loss.py (SILoss, linear path, v prediction) and train.py total, written in REPA's own terms:
    t = 0 data, x_t = (1 - t) x + t eps, target eps - x; proj = -mean_tokens cos(teacher, projector) in fp32."""
    t = 1 - t_ours                                     # the same time in REPA's convention
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x + tb * noise
    target = noise - x
    out, zs = model(x_t, t, y, force_drop_ids=drop)
    denoise = ((out - target) ** 2).mean(dim=(1, 2, 3))
    proj = 0.0
    for z, z_tilde in zip([tokens], zs):
        for j in range(x.shape[0]):
            zt = F.normalize(z_tilde[j].float(), dim=-1)
            zj = F.normalize(z[j].float(), dim=-1)
            proj = proj + (-(zj * zt).sum(dim=-1)).mean()
    proj = proj / (len(zs) * x.shape[0])
    return denoise.mean() + coeff * proj, proj


def _task_model_batch(cfg, n: int, seed: int):
    """The task of ``cfg``, its model (seed 0, reference attention) and a random batch of ``n`` with teacher tokens."""
    task = build_task(cfg)
    torch.manual_seed(0)
    model = task.build_model(attn_backend="reference")
    g = torch.Generator().manual_seed(seed)
    batch = {"latents": torch.randn(n, 4, 8, 8, generator=g), "labels": torch.randint(0, 4, (n,), generator=g),
             "teacher_tokens": torch.randn(n, 16, 64, generator=g).to(torch.bfloat16)}
    return task, model, batch


@pytest.mark.parametrize("model_name", ["SiT-tiny/2-REPA", "SiT-tiny/2-VAE-simple-REPA"])
def test_task_loss_equals_the_readable_reference(repa_data, tmp_path, model_name):
    cfg = R.repa_cfg(repa_data, str(tmp_path / "x"), "repa.proj_coeff=0.7", model=model_name)
    task, model, batch = _task_model_batch(cfg, n=5, seed=1)
    n = 5
    got = task.loss(model, batch, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)            # the task's draws, in its order: label drop, t, noise
    drop = (torch.rand(n, generator=gen) < cfg.model.class_dropout_prob).long()
    t = torch.rand(n, generator=gen)
    noise = torch.randn(batch["latents"].shape, generator=gen)
    if model.time_reversed:
        want, proj = _reference_repa_sit_loss(model, batch["latents"], batch["labels"], drop, t, noise,
                                              batch["teacher_tokens"], 0.7)
    else:   # the project's SiT: its own convention (t = 0 noise, v = x - eps), the same projection term
        tb = t.view(-1, 1, 1, 1)
        out, zs = model(tb * batch["latents"] + (1 - tb) * noise, t, batch["labels"], force_drop_ids=drop)
        mse = ((out - (batch["latents"] - noise)) ** 2).mean()
        cos = F.cosine_similarity(zs[0].float(), batch["teacher_tokens"].float(), dim=-1, eps=1e-12)
        proj = -cos.mean()
        want = mse + 0.7 * proj
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)
    assert task.window_metrics(1)["proj_loss"] == pytest.approx(float(proj.detach()), rel=1e-5)
    assert task.window_metrics(1) == {}           # the window was reset
    got.backward()
    assert model.projectors[0][0].weight.grad is not None and model.blocks[0].attn.qkv.weight.grad is not None


def test_dit_repa_task_runs_with_the_ddpm_loss(repa_data, tmp_path):
    """Ours, not REPA's: the DiT with REPA's projector, DDPM loss (learned sigma) + projection loss."""
    out = str(tmp_path / "dit")
    res = run(R.repa_cfg(repa_data, out, "schedule.max_steps=3", "data.batch_size=8", "checkpoint.every_steps=0",
                         model="DiT-tiny/2-VAE-simple-REPA"))
    recs = _records(out)
    assert res["step"] == 3 and len(recs) == 3 and all(r["proj_loss"] == r["proj_loss"] for r in recs)


def test_local_exact_resume(repa_data, tmp_path):
    """6 steps in one go == 3 steps, resume, 3 steps: losses and proj_loss per step, exports equal (the teacher
    tokens follow the loader's position: they are read with the latents' records)."""
    extra = ("schedule.max_steps=6", "data.batch_size=8", "checkpoint.every_steps=0", "ema.decay=0.9")
    run(R.repa_cfg(repa_data, str(tmp_path / "full"), *extra))
    run(R.repa_cfg(repa_data, str(tmp_path / "split"), *extra, "stop_after_steps=3"))
    run(R.repa_cfg(repa_data, str(tmp_path / "split"), *extra))
    a, b = _records(tmp_path / "full"), _records(tmp_path / "split")
    assert [(r["loss"], r["proj_loss"]) for r in a] == [(r["loss"], r["proj_loss"]) for r in b] and len(a) == 6
    from safetensors.torch import load_file
    for name in ("model", "ema"):
        x = load_file(str(tmp_path / "full" / "export" / f"{name}.safetensors"))
        y = load_file(str(tmp_path / "split" / "export" / f"{name}.safetensors"))
        assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_online_teacher_mode(repa_data, tmp_path):
    """repa.features=online: the batch keeps the crops the VAE encoded, the frozen teacher runs on them; its
    forward FLOPs are counted; the teacher stays outside the model and frozen."""
    out = str(tmp_path / "online")
    cfg = R.repa_cfg(repa_data, out, "schedule.max_steps=3", "data.batch_size=8", "checkpoint.every_steps=0",
                     "data.augment=adm", features="online")
    trainer = Trainer(cfg)
    try:
        teacher = trainer.task.repa.teacher
        assert teacher is not None and not teacher.net.training
        assert not any(p.requires_grad for p in teacher.net.parameters())
        model = trainer.engine.unwrapped
        own = {id(p) for p in model.parameters()}
        assert not any(id(p) in own for p in teacher.net.parameters())
        assert trainer.train_flops == 3 * model.flops_per_sample() + teacher.flops_per_image()
        batch = next(iter(trainer.loader))
        assert batch["images"].shape == (8, 3, 64, 64) and batch["latents"].shape == (8, 4, 8, 8)
        trainer.fit()
    finally:
        trainer.close()
    assert len(_records(out)) == 3


def test_refusals(repa_data, tmp_path):
    # a teacher-feature cache written by another teacher
    other = R.write_hub_teacher(str(tmp_path / "other.pth"), seed=9)
    cfg = R.repa_cfg(repa_data, str(tmp_path / "a"), f"repa.teacher_path={other}")
    with pytest.raises(Exception, match=r"teacher-feature cache .*does not match the job: teacher"):
        Trainer(cfg)
    # the teacher file missing, the cache folder unfinished: refused where read, naming the key, file and remedy
    cfg = R.repa_cfg(repa_data, str(tmp_path / "b"), f"repa.teacher_path={tmp_path}/nope.pth")
    with pytest.raises(FileNotFoundError, match=r"repa.teacher_path=.*nope.pth.*not found.*Nothing is downloaded"):
        Trainer(cfg)
    cfg = R.repa_cfg(repa_data, str(tmp_path / "b2"), f"repa.teacher_cache={tmp_path}")
    with pytest.raises(Exception, match=r"repa.teacher_cache=.*no manifest.json"):
        Trainer(cfg)
    # a token grid that differs from the model's
    with pytest.raises(ConfigError, match=r"repa.teacher_input_size=112 .*set repa.teacher_input_size=56"):
        R.repa_cfg(repa_data, str(tmp_path / "c"), "repa.teacher_input_size=112")
    # REPA's SiT with learned sigma, a plain model with repa, a REPA model without it, the cache without latents
    with pytest.raises(ConfigError, match=r"model.learn_sigma=True .*no learned-sigma output"):
        R.repa_cfg(repa_data, str(tmp_path / "d"), "model.learn_sigma=true")
    with pytest.raises(ConfigError, match=r"SiT-tiny/2 has no REPA projector"):
        R.repa_cfg(repa_data, str(tmp_path / "e"), "model.name=SiT-tiny/2")
    with pytest.raises(ConfigError, match=r"set repa.enabled=true to train it"):
        R.repa_cfg(repa_data, str(tmp_path / "f"), "repa.enabled=false")
    with pytest.raises(ConfigError, match=r"repa.encoder_depth=3 .*has 2 blocks"):
        R.repa_cfg(repa_data, str(tmp_path / "g"), "repa.encoder_depth=3")
    with pytest.raises(ConfigError, match=r"cached teacher tokens are read beside a latent cache"):
        R.repa_cfg(repa_data, str(tmp_path / "h"), "data.format=folder", f"data.root={repa_data['images']}")


def test_ddp_fsdp2_exact_resume_and_agreement(repa_data, tmp_path):
    """2 gloo ranks through the trainer: exact resume on ddp and fsdp2 (teacher tokens read with the latents'
    records, the position restored), and the two engines give the same losses."""
    sets = R.repa_overrides(repa_data) + ["checkpoint.init_from=", "data.batch_size=4"]
    p = H.torchrun(["tests/_helpers_train.py", "resume", "--out", str(tmp_path), "--cases", "ddp", "fsdp2",
                    "--set", *sets], timeout=600)
    assert p.stdout.count(H.OK) == 2, (p.stdout + p.stderr)[-6000:]
    res = json.load(open(tmp_path / "resume.json"))
    for spec in ("ddp", "fsdp2"):
        assert len(res[spec]["full"]) == 10 and res[spec]["full"] == res[spec]["split"], spec
        assert res[spec]["model_equal"] and res[spec]["ema_equal"], spec
    assert res["ddp"]["full"] == pytest.approx(res["fsdp2"]["full"], rel=1e-5)


def _check_repa_equiv(path, cases, tol_w=1e-5, online=False):
    ref_l, ref_sd = R.repa_engine_losses(H.engine_cfg("local"), online=online)
    res = json.load(open(path))
    for case in cases:
        assert res[case]["losses"] == pytest.approx(ref_l, rel=1e-6), case
        for k, v in ref_sd.items():
            assert torch.allclose(torch.tensor(res[case]["state"][k]), torch.tensor(v), atol=tol_w, rtol=0), (case, k)
    assert len(ref_l) == 3


def test_repa_losses_local_equal_ddp_fsdp2(tmp_path):
    """The REPA loss (transport + projection capture + total, the task's own pieces, draws fixed per sample) on the
    global batch in one process == ddp and fsdp2 on 2 gloo ranks: per-step losses and final weights. The same with
    the online teacher (``ddp_online``): each rank runs its own copy of the frozen teacher on its half of the
    pictures, and the losses and weights equal one process running it on the whole batch."""
    p = H.torchrun(["tests/_helpers_repa.py", "--out", str(tmp_path), "--cases", "ddp", "fsdp2", "ddp_online"])
    assert p.stdout.count(H.OK) == 2, (p.stdout + p.stderr)[-6000:]
    _check_repa_equiv(tmp_path / "repa_equiv.json", ["ddp", "fsdp2"])
    _check_repa_equiv(tmp_path / "repa_equiv.json", ["ddp_online"], online=True)
    res = json.load(open(tmp_path / "repa_equiv.json"))
    assert res["ddp_online"]["losses"] != res["ddp"]["losses"]   # the teacher's tokens, not the cached ones


@pytest.mark.slow
def test_repa_losses_local_equal_deepspeed_zero123(tmp_path):
    cases = ["ds1", "ds2", "ds3"]
    p = H.torchrun(["tests/_helpers_repa.py", "--out", str(tmp_path), "--cases", *cases], timeout=600)
    assert p.stdout.count(H.OK) == 2, (p.stdout + p.stderr)[-6000:]
    _check_repa_equiv(tmp_path / "repa_equiv.json", cases)


def test_repa_with_the_cosine_loss_logs_every_part(repa_data, tmp_path):
    """REPA on top of a diffusion loss with parts (dit.cosine_loss): the window metrics carry the diffusion task's
    mse_loss and cos_loss beside proj_loss, and loss = mse + cos + proj_coeff x proj."""
    cfg = R.repa_cfg(repa_data, str(tmp_path / "c"), "repa.proj_coeff=0.5", "dit.cosine_loss=true",
                     model="SiT-tiny/2-VAE-simple-REPA")
    task, model, batch = _task_model_batch(cfg, n=4, seed=2)
    loss = task.loss(model, batch, generator=torch.Generator().manual_seed(3))
    m = task.window_metrics(1)
    assert set(m) == {"mse_loss", "cos_loss", "proj_loss"}, m
    assert 0 < m["cos_loss"] < 2 and m["mse_loss"] > 0 and -1 <= m["proj_loss"] <= 1
    assert float(loss) == pytest.approx(m["mse_loss"] + m["cos_loss"] + 0.5 * m["proj_loss"], rel=1e-5, abs=1e-6)
    assert task.window_metrics(1) == {}
