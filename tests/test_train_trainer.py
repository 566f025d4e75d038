"""Trainer, checkpoints and launcher CLI on the local engine (in-process, CPU)."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402

from usp_scale.checkpoint import CheckpointManager, IncompatibleCheckpoint  # noqa: E402
from usp_scale.training import NonFiniteError, Trainer, run  # noqa: E402
from usp_scale.training.tasks import PretrainTask  # noqa: E402


def cfg_for(tmp_path, *over, engine="local"):
    return H.trainer_cfg(engine, str(tmp_path / "run"), **dict(o.split("=", 1) for o in over))


# ------------------------------------------------------------------------------------------ resume

def test_local_exact_resume(tmp_path):
    """5 steps + resume + 5 steps == 10 steps: per-step losses, final weights and EMA bit-identical."""
    r = H.run_resume_pair("local", str(tmp_path))
    assert len(r["full"]) == 10
    assert r["full"] == r["split"]
    assert r["model_equal"] and r["ema_equal"]


def test_outputs_jsonl_png_config_exports(tmp_path):
    cfg = cfg_for(tmp_path, "log_every=2", "schedule.max_steps=6")
    res = run(cfg)
    out = tmp_path / "run"
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [2, 4, 6]
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "mfu", "data_time", "compute_time", "max_mem_gb"):
        assert key in recs[0] and recs[0][key] == recs[0][key]  # present, not NaN
    # MFU = training FLOPs per sample x samples/s / peak: the FLOPs the trainer assumes must be what a forward +
    # backward of this model really costs (torch's FLOP counter, matmuls and attention), within 5 %.
    from torch.utils.flop_counter import FlopCounterMode

    from usp_scale.models import create_model

    torch.manual_seed(0)
    model = create_model(cfg.model.name, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans)
    with FlopCounterMode(display=False) as fc:
        loss, _, _ = model(torch.randn(4, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size),
                           mask_ratio=cfg.mask.ratio)
        loss.backward()
    counted = fc.get_total_flops() / 4
    for r in recs:
        assumed = r["mfu"] * cfg.peak_flops / r["samples_per_s"]
        assert assumed == pytest.approx(counted, rel=0.05), (assumed, counted)
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file()
    from usp_scale.config import load_config

    assert load_config(str(out / "config.yaml")).model.name == "vit_tiny_patch_vae"
    from safetensors.torch import load_file

    sd = load_file(res["exports"]["model"])
    official = torch.load(res["exports"]["official"], weights_only=False)
    assert set(official) == {"model"} and set(official["model"]) == set(sd)
    assert "pos_embed" in sd and "decoder_pred.weight" in sd
    assert os.path.basename(res["checkpoint"]) == "step_00000006"


# ------------------------------------------------------------------------------------------ checkpoints

class _FakeEngine:
    """Stands for an engine's checkpoint I/O part (engine.state)."""

    format = "dcp"

    def __init__(self, fail=False):
        self.fail = fail

    def save(self, path, ema_state=None):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "engine.pt"), "w") as f:
            f.write("partial")
        if self.fail:
            raise RuntimeError("simulated crash mid-save")


class _Counter:
    def __init__(self, step):
        self.step = step

    def state_dict(self):
        return {"step": self.step}


def _save(mgr, step, engine):
    mgr.engine_state, mgr.states = engine, {"train": _Counter(step)}
    return mgr.save(step, meta={"step": step, "signature": {}, "config": {}})


def test_crash_mid_save_leaves_no_complete_folder(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=3)
    good = _save(mgr, 10, _FakeEngine())
    with pytest.raises(RuntimeError, match="simulated crash"):
        _save(mgr, 20, _FakeEngine(fail=True))
    assert not (tmp_path / "step_00000020").exists()
    assert not (tmp_path / ".tmp-step_00000020").exists()  # a failed save removes its partial folder ...
    (tmp_path / ".tmp-step_00000015").mkdir()  # ... and one a kill -9 left behind goes at the next save
    assert mgr.latest() == good
    # a step folder without meta.json (e.g. copied by hand, half-way) is not considered complete
    (tmp_path / "step_00000030").mkdir()
    assert mgr.latest() == good
    assert _save(mgr, 20, _FakeEngine()).endswith("step_00000020")
    assert not (tmp_path / ".tmp-step_00000020").exists()


def test_keep_last_k(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    for s in range(1, 6):
        _save(mgr, s, _FakeEngine())
    assert [os.path.basename(p) for p in mgr.list_steps()] == ["step_00000004", "step_00000005"]
    _save(mgr, 5, _FakeEngine())  # re-saving a step replaces it
    assert len(mgr.list_steps()) == 2


def test_refuse_incompatible_checkpoint(tmp_path):
    run(cfg_for(tmp_path, "stop_after_steps=2"))
    with pytest.raises(IncompatibleCheckpoint) as e:
        run(cfg_for(tmp_path, "model.img_size=4"))
    msg = str(e.value)
    assert "pos_embed" in msg and "model.img_size" in msg and "checkpoint 8 vs now 4" in msg
    with pytest.raises(IncompatibleCheckpoint, match="optim.name"):
        run(cfg_for(tmp_path, "optim.name=lars"))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        run(cfg_for(tmp_path, f"checkpoint.resume={tmp_path}/nowhere"))


def test_old_checkpoint_format_is_refused(tmp_path):
    """A format-1 checkpoint (engine/engine.pt, per-rank RNG files; meta.json without "format") is refused by name."""
    from usp_scale.checkpoint.safe_load import read_checked_json, write_checked_json

    run(cfg_for(tmp_path, "stop_after_steps=2"))
    meta_path = tmp_path / "run" / "checkpoints" / "step_00000002" / "meta.json"
    meta = read_checked_json(str(meta_path), what="checkpoint metadata", key="meta_sha256")
    del meta["format"]
    write_checked_json(str(meta_path), meta, key="meta_sha256")
    with pytest.raises(IncompatibleCheckpoint, match=rf"{meta_path} is a checkpoint of format 1 .*this version reads "
                                                     "format 2"):
        run(cfg_for(tmp_path))


# ------------------------------------------------------------------------------------------ non-finite

class _NaNTask(PretrainTask):
    """Pretrain task whose loss is NaN on chosen calls (call k is micro-batch k; the trainer runs no other forward)."""

    def __init__(self, cfg, bad):
        super().__init__(cfg)
        self.bad, self.calls = set(bad), 0

    def loss(self, engine, batch, generator=None):
        loss = super().loss(engine, batch, generator)
        self.calls += 1
        return loss * float("nan") if self.calls in self.bad else loss


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    cfg = cfg_for(tmp_path, "schedule.max_steps=4", "ema.decay=0.0", "optim.clip_grad=0.0")
    # call 4 = micro-batch 4, the 2nd half of optimizer step 2 (accum 2): step 2 must be skipped
    res = Trainer(cfg, task=_NaNTask(cfg, bad={4})).fit()
    assert res["nonfinite_total"] == 1
    recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["nonfinite_total"] for r in recs] == [0, 1, 1, 1]
    assert [r["loss"] == r["loss"] for r in recs] == [True, False, True, True]  # only step 2 is NaN


def test_nonfinite_skip_leaves_weights_unchanged():
    from usp_scale.config import EngineConfig

    _, applied, _ = H.engine_losses(EngineConfig(name="local"), steps=3, nan_at=1)
    assert applied == [True, False, True]
    # (1 good step, 1 skipped step) leaves exactly the weights of 1 good step
    _, _, sd1 = H.engine_losses(EngineConfig(name="local"), steps=1)
    _, a2, sd2 = H.engine_losses(EngineConfig(name="local"), steps=2, nan_at=1)
    assert a2 == [True, False]
    assert all(torch.equal(torch.tensor(sd1[k]), torch.tensor(sd2[k])) for k in sd1)


def test_k_nonfinite_in_a_row_checkpoints_and_stops(tmp_path):
    cfg = cfg_for(tmp_path, "max_nonfinite=3", "schedule.max_steps=10")
    with pytest.raises(NonFiniteError) as e:
        Trainer(cfg, task=_NaNTask(cfg, bad=set(range(5, 40)))).fit()  # micro-batches 5.. -> steps 3..
    msg = str(e.value)
    assert "3 consecutive non-finite steps" in msg and "optimizer step 5" in msg and "epoch 0" in msg
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000005"
    assert str(ckpt) in msg and (ckpt / "meta.json").is_file()


# ------------------------------------------------------------------------------------------ tasks

# ------------------------------------------------------------------------------------------ CLI

def test_launcher_cli(tmp_path, capsys):
    from usp_scale.training.cli import main

    assert main(["--help-config"]) == 0
    out = capsys.readouterr().out
    assert "engine.zero_stage" in out and "checkpoint.keep_last" in out
    cfgp = os.path.join(H.REPO, "configs", "debug", "synthetic_pretrain.yaml")
    assert main(["--config", cfgp, "--deepspeed_config", "x.json"]) == 2
    assert "engine.name=deepspeed" in capsys.readouterr().err
    assert main(["--config", cfgp, "task=dit"]) == 2
    assert main(["--config", cfgp, "nope.key=1"]) == 2
    assert main(["--config", cfgp, "--local_rank=0", f"output_dir={tmp_path}/cli", "schedule.max_steps=2",
                 "engine.precision=fp32"]) == 0
    assert (tmp_path / "cli" / "export" / "model.safetensors").is_file()
    assert main(["--task", "dit", "--config", cfgp, "model.name=DiT-tiny/2", "--print-config"], finetune=True) == 0
    assert "task: dit" in capsys.readouterr().out


def test_tiny_pretrain_transfer_dit_pipeline_loss_goes_down(tmp_path):
    """Real tiny MAE pretrain -> init a DiT-tiny/2-VAE-simple from its export (transfer) -> DDPM finetune."""
    res = run(H.trainer_cfg("local", str(tmp_path / "mae"), **{"schedule.max_steps": 30, "data.synthetic_samples": 64,
                                                                "ema.decay": 0.0, "log_every": 5}))
    mae = [json.loads(line)["loss"] for line in open(tmp_path / "mae" / "metrics.jsonl")]
    assert mae[-1] < mae[0]
    dit_cfg = H.trainer_cfg("local", str(tmp_path / "dit"), **{
        "task": "dit", "model.name": "DiT-tiny/2-VAE-simple", "model.num_classes": 10, "schedule.name": "constant",
        "optim.lr": 1e-3, "optim.weight_decay": 0.0, "optim.beta2": 0.999, "schedule.max_steps": 40,
        "schedule.accum_iter": 1, "ema.decay": 0.999, "data.synthetic_samples": 64, "log_every": 5,
        "checkpoint.init_from": res["exports"]["model"]})
    out = run(dit_cfg)
    dit = [json.loads(line)["loss"] for line in open(tmp_path / "dit" / "metrics.jsonl")]
    assert sum(dit[-3:]) / 3 < 0.8 * sum(dit[:2]) / 2, dit
    off = torch.load(out["exports"]["official"], weights_only=False)
    assert set(off) == {"model", "ema", "opt", "args"}
    # The DiT the trainer started from (built as the trainer builds it) holds the MAE export's values: every
    # encoder block tensor and the patch embedding, copied; adaLN-Zero modulation zero. Training then moved them.
    from safetensors.torch import load_file

    from usp_scale.training.tasks import build_task

    mae_sd = load_file(res["exports"]["model"])
    torch.manual_seed(123)  # the copied values must not depend on the initialisation they overwrite
    init = build_task(dit_cfg).build_model().state_dict()
    final = load_file(str(tmp_path / "dit" / "export" / "model.safetensors"))
    block_keys = [k for k in mae_sd if k.startswith("blocks.")]
    assert len(block_keys) == 2 * 12
    for k in block_keys:
        assert torch.equal(init[k], mae_sd[k]), k
        assert not torch.equal(final[k], init[k]), k
    assert torch.equal(init["x_embedder.proj.weight"], mae_sd["patch_embed.proj.weight"])
    for k in ("blocks.0.adaLN_modulation.1.weight", "blocks.1.adaLN_modulation.1.bias"):
        assert not init[k].any(), k


def test_real_cls_and_linprobe_tasks(tmp_path):
    """cls: layer decay, mixup/cutmix, top-1/top-5 eval records; linprobe: only the BN + Linear head trains, LARS."""
    for task, extra in (("cls", {"optim.layer_decay": 0.75, "model.drop_path_rate": 0.1, "cls.mixup": 0.8,
                                 "cls.cutmix": 1.0, "optim.beta2": 0.999}),
                        ("linprobe", {"optim.name": "lars", "optim.blr": 0.1, "optim.weight_decay": 0.0,
                                      "model.global_pool": "token"})):
        cfg = H.trainer_cfg("local", str(tmp_path / task), **{
            "task": task, "model.name": "vit_tiny_patch16_vae", "model.num_classes": 10, "schedule.max_steps": 3,
            "ema.decay": 0.0, "data.synthetic_samples": 64, **extra})
        t = Trainer(cfg)
        res = t.fit()
        model = t.engine.unwrapped
        # The reported top-1 / top-5 / loss are those of the final model over the whole val split, recomputed here
        # independently (a wrong top-k, average, sample count or a model left in train mode would differ).
        from usp_scale.training.trainer import default_loader

        model.eval()
        logits, labels = [], []
        with torch.no_grad():
            for batch in default_loader(cfg, rank=0, world_size=1, device=torch.device("cpu"), train=False):
                logits.append(model(batch["latents"]).float())
                labels.append(batch["labels"])
        logits, labels = torch.cat(logits), torch.cat(labels)
        rank = (logits > logits.gather(1, labels[:, None])).sum(1)   # classes scored above the true one
        ev = res["eval"]
        assert ev["val_samples"] == len(labels) == 64
        assert ev["top1"] == pytest.approx(100.0 * (rank == 0).float().mean().item(), abs=1e-9)
        assert ev["top5"] == pytest.approx(100.0 * (rank < 5).float().mean().item(), abs=1e-9)
        assert ev["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
        if task == "linprobe":
            assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.1.weight", "head.1.bias"}
            assert isinstance(model.head[0], torch.nn.BatchNorm1d) and model.head[0].affine is False
            assert type(t.engine.optimizer).__name__ == "LARS"
        else:
            scales = sorted({g["lr_scale"] for g in t.engine.param_groups})  # depth 2 -> layers 0..3
            assert scales == pytest.approx([0.421875, 0.5625, 0.75, 1.0])
            recs = [json.loads(line) for line in open(tmp_path / task / "metrics.jsonl")]
            assert any(r["kind"] == "eval" and "top5" in r for r in recs)


def test_task_model_family_mismatch_is_an_error(tmp_path):
    from usp_scale.config import ConfigError

    with pytest.raises(ConfigError, match="task=dit needs a dit model"):
        Trainer(H.trainer_cfg("local", str(tmp_path), task="dit")).fit()


def test_stop_file_checkpoints_and_exits_then_resume_finishes(tmp_path):
    """What the SLURM scripts do on SIGUSR1: touch STOP_AND_CHECKPOINT; the trainer saves and exits."""
    from usp_scale.cluster.slurm import STOP_FILE

    cfg = cfg_for(tmp_path, "log_every=3")
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / STOP_FILE).touch()
    res = run(cfg)
    assert res["stopped_by_request"] and res["step"] == 3 and "exports" not in res
    assert not (tmp_path / "run" / STOP_FILE).exists()
    assert os.path.basename(CheckpointManager(str(tmp_path / "run" / "checkpoints")).latest()) == "step_00000003"
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:  # records a crashed run wrote after the checkpoint
        f.write(json.dumps({"kind": "train", "step": 4, "loss": 123.0}) + "\n")
    res = run(cfg_for(tmp_path, "log_every=3"))  # the requeued job
    assert res["step"] == 10 and not res["stopped_by_request"] and "model" in res["exports"]
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [3, 6, 9, 10]


class _RngHungryLoader:
    """Loader wrapper that draws from the global CPU RNG when an epoch starts, like torch's DataLoader does."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, e):
        self.inner.set_epoch(e)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, sd):
        self.inner.load_state_dict(sd)

    def __iter__(self):
        torch.randint(0, 2 ** 62, ())  # e.g. DataLoader's worker base seed
        yield from self.inner


def _hungry_factory(cfg, **kw):
    from usp_scale.training.trainer import default_loader

    return _RngHungryLoader(default_loader(cfg, **kw))


def test_resume_exact_even_if_the_loader_draws_global_random_numbers(tmp_path):
    def losses(d):
        return [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]

    Trainer(cfg_for(tmp_path / "a"), loader_factory=_hungry_factory).fit()
    Trainer(cfg_for(tmp_path / "b", "stop_after_steps=4"), loader_factory=_hungry_factory).fit()
    Trainer(cfg_for(tmp_path / "b"), loader_factory=_hungry_factory).fit()
    assert losses(tmp_path / "a" / "run") == losses(tmp_path / "b" / "run")


@pytest.mark.slow
def test_exact_resume_with_the_real_image_pipeline(tmp_path):
    """configs/debug/tiny.yaml: synthetic JPEGs -> torchvision augmentations -> tiny-random VAE -> MAE."""
    import subprocess

    data = tmp_path / "synthetic"
    subprocess.run([sys.executable, "launchers/make_synthetic.py", "--out", str(data), "--classes", "4",
                    "--per-class", "24", "--size", "64"], cwd=H.REPO, check=True, capture_output=True)
    from usp_scale.config import load_config

    def cfg(out, *extra):
        return load_config(os.path.join(H.REPO, "configs", "debug", "tiny.yaml"),
                           [f"data.root={data}", f"output_dir={out}", "progress=false", "log_every=1",
                            "schedule.epochs=2", "data.batch_size=8", "checkpoint.every_steps=0", *extra])

    def losses(d):
        return [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]

    run(cfg(tmp_path / "full"))
    run(cfg(tmp_path / "split", "stop_after_steps=9"))  # mid-epoch 0 (12 steps per epoch)
    run(cfg(tmp_path / "split"))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert len(a) == 24 and a == b


@pytest.mark.parametrize("task,model", [("sit", "SiT-tiny/2"), ("dit", "DiT-tiny/2")])
def test_real_generative_tasks_with_real_losses(tmp_path, task, model):
    """The registry models with usp_scale.diffusion / usp_scale.transport losses through the launcher CLI;
    EMA and the official export (model, ema, opt, args)."""
    from usp_scale.training.cli import main

    rc = main(["--task", task, "--config", os.path.join(H.REPO, "configs", "debug", "synthetic_pretrain.yaml"),
               f"output_dir={tmp_path}/{task}", f"model.name={model}", "model.num_classes=10", "schedule.name=constant",
               "optim.lr=1e-3", "optim.weight_decay=0.0", "schedule.max_steps=4", "ema.decay=0.9999",
               "engine.precision=fp32"], finetune=True)
    assert rc == 0
    recs = [json.loads(line) for line in open(tmp_path / task / "metrics.jsonl")]
    assert len(recs) == 4 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in recs)
    off = torch.load(str(tmp_path / task / "export" / "0000004.pt"), weights_only=False)
    assert set(off) == {"model", "ema", "opt", "args"} and off["args"]["task"] == task
    assert set(off["ema"]) == set(off["model"]) and "pos_embed" in off["ema"]
    # EMA after 4 steps at 0.9999 is still (almost) the initial weights, the model is not
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(off["ema"][w], off["model"][w])


def test_bench_step_smoke_times_each_kernel_choice(tmp_path, capsys):
    """benchmarks/train/bench_step.py --smoke: tiny real model, synthetic latents, one row per kernels choice; the
    Triton row (the interpreter on a CPU) is a different path from the torch row with the same gradient norm."""
    import csv
    import importlib.util

    from usp_scale.kernels.dispatch import interpreting, resolve_impl

    spec = importlib.util.spec_from_file_location("bench_step", os.path.join(H.REPO, "benchmarks", "train",
                                                                             "bench_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.csv"
    kernels = ["torch", "auto"] + (["triton"] if interpreting() else [])
    assert bench.main(["--smoke", "--models", "MAE-tiny", "--kernels", ",".join(kernels), "--device", "cpu",
                       "--csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["model"], r["kernels"], r["compile"]) for r in rows] == [("MAE-tiny", k, "False") for k in kernels]
    assert rows[0]["vs_torch_eager"] == "1.0" and float(rows[1]["samples_per_s"]) > 0
    # "auto" on a CPU is the torch path for every op, so the same batch and init give the same norm
    ops = ("embed_visible_patches", "unshuffle", "masked_latent_loss", "layernorm_modulate", "gated_residual")
    assert {resolve_impl("auto", "cpu", op) for op in ops} == {"torch"}
    assert rows[0]["grad_norm"] == rows[1]["grad_norm"]
    if interpreting():  # the forced Triton kernels: another path, the same gradient norm within rounding
        assert float(rows[2]["grad_norm"]) == pytest.approx(float(rows[0]["grad_norm"]), rel=1e-3, abs=2e-4)
    assert {"date", "device", "torch"} <= set(rows[0])
    with pytest.raises(SystemExit, match="--kernels"):
        bench.main(["--smoke", "--kernels", "cuda"])
