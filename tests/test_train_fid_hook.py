"""In-training FID hook (usp_scale.eval.hook) on tiny DiT/SiT runs over the synthetic dataset:
eval records every N steps and at the end, sample grids, the numbers match an independent evaluation of
the exported EMA, exact resume is unaffected, and bad settings fail at start-up."""
import json
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"kind", "step", "epoch", "metric", "fid", "num_samples", "sampler", "sampling_steps", "cfg_scale",
          "sampling_precision", "reference", "feature_extractor", "weights", "grid", "eval_seconds", "protocol"}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from usp_scale.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("fidhook_data") / "synthetic"
    make_synthetic(str(root), classes=4, per_class=8, size=64, val_per_class=4)
    return str(root)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("USP_SCALE_CACHE", str(tmp_path / "eval_cache"))  # reference-feature cache


def cfg_for(out, data, task="dit", *extra):
    from usp_scale.config import load_config

    model = {"dit": "DiT-tiny/2-VAE-simple", "sit": "SiT-tiny/2"}[task]
    sampler = {"dit": "ddpm", "sit": "sde"}[task]
    return load_config(os.path.join(REPO, "configs", "debug", "tiny_dit.yaml"), [
        f"task={task}", f"model.name={model}", "model.num_classes=4", f"data.root={data}", "data.num_classes=4",
        "data.batch_size=8", f"output_dir={out}", "checkpoint.init_from=", "checkpoint.every_steps=0",
        "schedule.max_steps=3", "log_every=1", "progress=false", "tensorboard=false", "plot=false",
        "eval.fid_every=2", "eval.fid_samples=16", f"eval.fid_reference={data}/val",
        "eval.feature_extractor=usp-tiny", f"eval.sampler={sampler}", "eval.steps=4", "eval.batch_size=16",
        *extra])


def records(out, kind):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_dit_fid_every_n_steps_and_at_the_end_matches_the_exported_ema(tmp_path, synthetic):
    from safetensors.torch import load_file

    from usp_scale.eval import evaluate_fid, save_sample_grid
    from usp_scale.training import run
    from usp_scale.training.tasks import build_task
    from usp_scale.vae import FrozenVAE

    out = str(tmp_path / "dit")
    cfg = cfg_for(out, synthetic)
    run(cfg)
    ev = records(out, "eval")
    assert [r["step"] for r in ev] == [2, 3]  # every 2 steps, and the last step (3)
    for r in ev:
        assert set(r) == FIELDS
        assert r["metric"] == "fid" and np.isfinite(r["fid"]) and r["fid"] > 0
        assert (r["num_samples"], r["sampler"], r["sampling_steps"], r["cfg_scale"], r["sampling_precision"]) == \
            (16, "ddpm", 4, 1.0, "fp32")
        assert r["reference"] == f"{synthetic}/val" and r["feature_extractor"] == "usp-tiny" and r["weights"] == "ema"
        assert r["protocol"] == "torch-fidelity"       # eval.protocol=auto with a folder reference
        assert r["grid"] == os.path.join(out, "samples", f"step_{r['step']:07d}.png") and os.path.isfile(r["grid"])
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["step_0000002.png", "step_0000003.png"]
    assert len(records(out, "train")) == 3
    with open(os.path.join(out, "eval_metrics.jsonl")) as f:  # the eval package's own record file
        side = [json.loads(line) for line in f]
    assert [(r["metric"], r["step"], r["value"]) for r in side] == [("fid", r["step"], r["fid"]) for r in ev]

    # Independent check: the final FID and grid come from the EMA weights the run exported.
    model = build_task(cfg).build_model()
    model.load_state_dict(load_file(os.path.join(out, "export", "ema.safetensors")))
    vae = FrozenVAE.from_config(cfg.vae)
    task = build_task(cfg)
    ref = evaluate_fid(model, task.diffusion, vae, cfg.eval, 16)
    assert ref["fid"] == pytest.approx(ev[-1]["fid"], rel=1e-6, abs=1e-9)
    grid = save_sample_grid(model, task.diffusion, vae, cfg.eval, str(tmp_path / "grid.png"), num=16)
    a, b = _png(grid).astype(int), _png(ev[-1]["grid"]).astype(int)
    assert a.shape == b.shape and a.shape[0] >= 4 * 64 and a.shape[1] >= 4 * 64  # 4x4 grid of 64 px images
    assert np.abs(a - b).max() <= 1  # same fixed noise and labels (batch rounding may move a level)
    # training moved the EMA, so the two grids differ from each other but each is reproducible
    assert not np.array_equal(_png(ev[0]["grid"]), _png(ev[1]["grid"]))


class _FakeWriter:
    scalars = []

    def __init__(self, logdir, purge_step=None):   # SummaryWriter's signature (purge_step: set on resume)
        pass

    def add_scalar(self, tag, value, step):
        _FakeWriter.scalars.append((tag, value, step))

    def close(self):
        pass


@pytest.mark.parametrize("sampler", ["sde", "euler"])
def test_sit_fid_hook_with_the_model_weights_when_ema_is_off(tmp_path, synthetic, sampler, monkeypatch):
    import sys
    import types

    from usp_scale.training import run

    # TensorBoard is not installed here: a stand-in SummaryWriter records what the logger sends it.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_FakeWriter))
    _FakeWriter.scalars = []
    out = str(tmp_path / "sit")
    run(cfg_for(out, synthetic, "sit", f"eval.sampler={sampler}", "ema.decay=0", "schedule.max_steps=2",
                "tensorboard=true"))
    ev = records(out, "eval")
    assert [r["step"] for r in ev] == [2]  # the step-2 evaluation is also the final one: not run twice
    assert ev[0]["sampler"] == sampler and ev[0]["weights"] == "model" and np.isfinite(ev[0]["fid"])
    assert os.path.isfile(os.path.join(out, "samples", "step_0000002.png"))
    assert ("fid", ev[0]["fid"], 2) in _FakeWriter.scalars


def test_exact_resume_with_fid_on_and_fid_does_not_touch_the_training_rng(tmp_path, synthetic):
    from usp_scale.training import run

    full, split, off = (str(tmp_path / n) for n in ("full", "split", "off"))
    extra = ("schedule.max_steps=4",)
    run(cfg_for(full, synthetic, "dit", *extra))
    run(cfg_for(split, synthetic, "dit", *extra, "stop_after_steps=2"))
    assert [r["step"] for r in records(split, "eval")] == [2]
    run(cfg_for(split, synthetic, "dit", *extra))
    run(cfg_for(off, synthetic, "dit", *extra, "eval.fid_every=0"))
    losses = {d: [r["loss"] for r in records(d, "train")] for d in (full, split, off)}
    assert len(losses[full]) == 4 and losses[full] == losses[split] == losses[off]
    fa, fb = records(full, "eval"), records(split, "eval")
    assert [r["step"] for r in fa] == [r["step"] for r in fb] == [2, 4]
    assert [r["fid"] for r in fa] == [r["fid"] for r in fb]
    assert records(off, "eval") == [] and not os.path.exists(os.path.join(off, "samples"))


def test_evaluation_missed_before_a_resume_is_caught_up(tmp_path, synthetic):
    """A job stopped after its step-2 checkpoint but before the step-2 FID runs that FID first on resume."""
    from usp_scale.training import run

    out = str(tmp_path / "r")
    run(cfg_for(out, synthetic, "dit", "schedule.max_steps=4", "stop_after_steps=2", "eval.fid_every=0"))
    assert records(out, "eval") == []
    run(cfg_for(out, synthetic, "dit", "schedule.max_steps=4"))
    assert [r["step"] for r in records(out, "eval")] == [2, 4]
    run(cfg_for(out, synthetic, "dit", "schedule.max_steps=4"))  # finished run resumed: nothing is redone
    assert [r["step"] for r in records(out, "eval")] == [2, 4]


@pytest.mark.parametrize("override,key", [
    ("eval.fid_reference=", "eval.fid_reference"),
    ("eval.fid_reference=/nonexistent/val", "eval.fid_reference=/nonexistent/val"),
    ("eval.feature_extractor=inception-v3-compat", "eval.inception_weights"),
    ("eval.feature_extractor=no-such-net", "eval.feature_extractor"),
    ("eval.sampler=ddpm", "eval.sampler"),  # a DiT sampler for a SiT run
])
def test_bad_eval_settings_fail_at_start_up(tmp_path, synthetic, monkeypatch, override, key):
    from usp_scale.config import ConfigError
    from usp_scale.training import Trainer

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no Inception weights anywhere
    out = tmp_path / "bad"
    started = []
    monkeypatch.setattr("usp_scale.training.trainer.build_engine",
                        lambda *a, **k: started.append(1) or pytest.fail("reached the engine"))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):  # at config load (rules) or at start-up
        Trainer(cfg_for(str(out), synthetic, "sit", override)).fit()
    # nothing of a run: the start-up's writability check may leave the empty checkpoints folder, no step in it
    assert not started and not os.path.exists(out / "metrics.jsonl")
    assert not os.path.exists(out / "checkpoints") or not os.listdir(out / "checkpoints")


def test_fid_on_a_non_generative_task_is_an_error(tmp_path, synthetic):
    from usp_scale.config import ConfigError
    from usp_scale.training import Trainer

    with pytest.raises(ConfigError, match=r"eval\.fid_every=2 .*in-training FID is for task=dit or sit"):
        Trainer(cfg_for(str(tmp_path / "p"), synthetic, "dit", "task=pretrain", "model.name=vit_tiny_patch_vae")).fit()


@pytest.mark.slow
def test_fid_hook_under_ddp_fsdp2_deepspeed_zero3_two_ranks(tmp_path, synthetic):
    """World size 2: the logged FID equals an independent FID of the exported EMA (so every rank sampled with
    the full gathered EMA), and 2 + resume + 2 steps reproduce the losses and FIDs of 4 steps."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _helpers_train as H

    engines = ["ddp", "fsdp2", "deepspeed:3"]
    p = H.torchrun(["tests/_helpers_fidhook.py", "--out", str(tmp_path), "--data", synthetic, "--engines", *engines],
                   timeout=900)
    assert p.stdout.count("FIDHOOK_OK") == 2, p.stdout[-3000:] + p.stderr[-5000:]
    res = json.load(open(tmp_path / "fidhook.json"))
    for e in engines:
        r = res[e]
        assert len(r["full_losses"]) == 4 and r["full_losses"] == r["split_losses"], e
        assert [x[0] for x in r["full_eval"]] == [2, 4] and r["full_eval"] == r["split_eval"], e
        assert all(x[2] == 10 and x[3] == "ema" for x in r["full_eval"]), e
        assert r["grids"] == ["step_0000002.png", "step_0000004.png"], e
        assert r["full_eval"][-1][1] == pytest.approx(r["independent_fid"], rel=1e-5), e


def _eval_side(out):
    """(steps, fids) in eval_metrics.jsonl and the steps named in eval_metrics.txt."""
    with open(os.path.join(out, "eval_metrics.jsonl")) as f:
        side = [json.loads(line) for line in f]
    with open(os.path.join(out, "eval_metrics.txt")) as f:
        txt = [line.split(" step=")[1].strip() for line in f]
    return [r["step"] for r in side], [r["value"] for r in side], [int(s) for s in txt]


def test_resume_from_an_earlier_checkpoint_keeps_one_record_per_step_in_every_jsonl(tmp_path, synthetic):
    """Kill/resume: a finished 4-step run (FID at 2 and 4, checkpoints at 2 and 4) resumed from its step-2
    checkpoint re-trains steps 3-4; metrics.jsonl and eval_metrics.jsonl/.txt both drop what was written after
    step 2, so no step appears twice, and the redone records equal the first ones (exact resume). Then a kill
    between the two record writes of the step-4 FID (eval_metrics.jsonl written, metrics.jsonl not): the
    evaluation caught up on resume replaces its record instead of adding a second one."""
    from usp_scale.training import run

    out = str(tmp_path / "r")
    extra = ("schedule.max_steps=4", "checkpoint.every_steps=2")
    run(cfg_for(out, synthetic, "dit", *extra))
    first_train, first_eval = records(out, "train"), records(out, "eval")
    first_side = _eval_side(out)
    assert [r["step"] for r in first_eval] == [2, 4] and first_side[0] == first_side[2] == [2, 4]
    with open(os.path.join(out, "eval_metrics.jsonl"), "a") as f:
        f.write('{"metric": "fid", "step": 5, "val')  # a torn line from a killed writer
    step2 = os.path.join(out, "checkpoints", "step_00000002")
    run(cfg_for(out, synthetic, "dit", *extra, f"checkpoint.resume={step2}"))
    for kind, first in (("train", first_train), ("eval", first_eval)):
        recs = records(out, kind)
        assert [r["step"] for r in recs] == [r["step"] for r in first], kind
        drop = ("eval_seconds", "samples_per_s", "data_time", "compute_time", "max_mem_gb", "mfu")
        assert [{k: v for k, v in r.items() if k not in drop} for r in recs] == \
            [{k: v for k, v in r.items() if k not in drop} for r in first], kind
    assert _eval_side(out) == first_side

    # killed after eval_metrics.jsonl got the step-4 FID but before metrics.jsonl did
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [ln for ln in f if not ('"kind": "eval"' in ln and '"step": 4,' in ln)]
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(lines)
    run(cfg_for(out, synthetic, "dit", *extra))  # latest checkpoint: step 4 = the end; catches up the FID
    assert [r["step"] for r in records(out, "eval")] == [2, 4]
    assert _eval_side(out) == first_side
