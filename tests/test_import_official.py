"""An official MAE pretraining checkpoint ({"model", "optimizer", "epoch", "scaler", "args"}, as the official
main_pretrain.py saves it) continued here as a resumable run (launchers/import_official.py).

The official file is written the official way: a torch AdamW over timm's own ``param_groups_weight_decay`` (the
function the official code calls: groups [no decay, decay] over the trainable parameters), holding the moments of a
real run, the fp16 GradScaler's state, the last finished epoch and an argparse.Namespace, saved with torch.save. The
run it came from is one of ours stopped after 2 of 4 epochs; imported and resumed, the continuation must reproduce
the uninterrupted run's last two epochs exactly (weights, moments, loss scale, step, lr and data position all carried
over)."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from timm.optim import param_groups_weight_decay

from usp_scale.checkpoint.official_mae import OfficialImportError, official_mae_param_names
from usp_scale.config import load_config
from usp_scale.training.import_official import import_official_mae
from usp_scale.training.rundir import unlock_run_dir
from usp_scale.training.trainer import Trainer, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "configs/debug/synthetic_pretrain.yaml")
# 16 random latents, batch 4: 4 steps per epoch, 4 epochs; fp16 autocast + GradScaler as the official pretraining
COMMON = ["data.synthetic_samples=16", "engine.precision=fp16", "checkpoint.every_steps=0", "tensorboard=false",
          "plot=false"]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: (r["loss"], r["lr"]) for r in map(json.loads, f) if r.get("kind") == "train"}


def _official_checkpoint(run_dir, path, epoch):
    """Our run's newest checkpoint rewritten as the official code writes its checkpoint-N.pth."""
    cfg = load_config(RECIPE, COMMON + [f"output_dir={run_dir}", f"checkpoint.resume={run_dir}"])
    tr = Trainer(cfg)
    try:
        model, ours = tr.engine.unwrapped, tr.engine.optimizer
        official = torch.optim.AdamW(param_groups_weight_decay(model, cfg.optim.weight_decay), lr=1e-3,
                                     betas=(0.9, 0.95))
        for g in ours.param_groups:   # the same parameter objects: move each one's moments across
            for p in g["params"]:
                official.state[p] = {k: v.clone() for k, v in ours.state[p].items()}
        args = argparse.Namespace(model="mae_vit_tiny_patch2", epochs=4, blr=cfg.optim.blr, lr=None,
                                  weight_decay=cfg.optim.weight_decay, warmup_epochs=2, mask_ratio=0.75,
                                  norm_pix_loss=True, batch_size=4, accum_iter=1, input_size=64)
        torch.save({"model": model.state_dict(), "optimizer": official.state_dict(), "epoch": epoch,
                    "scaler": tr.engine.scaler.state_dict(), "args": args}, path)
        return official.state_dict(), tr.engine.scaler.get_scale()
    finally:
        tr.close()
        unlock_run_dir(run_dir)


@pytest.fixture(scope="module")
def official_run(tmp_path_factory):
    """(uninterrupted run folder, official checkpoint-1.pth of the same run after epoch 1, official optimizer sd)."""
    tmp = tmp_path_factory.mktemp("official")
    ref, half = str(tmp / "ref"), str(tmp / "half")
    run(load_config(RECIPE, COMMON + [f"output_dir={ref}"]))
    run(load_config(RECIPE, COMMON + [f"output_dir={half}", "stop_after_steps=8"]))   # epochs 0 and 1
    path = str(tmp / "checkpoint-1.pth")
    osd, scale = _official_checkpoint(half, path, epoch=1)
    return ref, path, osd, scale


def test_official_grouping_is_timms(official_run):
    """The group sizes and order rebuilt from the file's state-dict order equal timm's grouping of the model."""
    _, path, osd, _ = official_run
    sd = torch.load(path, weights_only=False)["model"]   # the test's own file
    from usp_scale.models import create_model
    model = create_model("vit_tiny_patch_vae", img_size=8, in_chans=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = official_mae_param_names(sd, trainable)
    timm_groups = param_groups_weight_decay(model, 0.05)
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert [[by_id[id(p)] for p in g["params"]] for g in timm_groups] == groups
    assert [len(g["params"]) for g in osd["param_groups"]] == [len(g) for g in groups]
    assert "pos_embed" not in sum(groups, []) and "cls_token" in groups[1]   # frozen out; 3-D tokens are decayed


def test_imported_official_run_continues_exactly(official_run, tmp_path, capsys):
    ref, path, _, scale = official_run
    cont = str(tmp_path / "cont")
    res = import_official_mae(RECIPE, COMMON + [f"output_dir={cont}"], path)
    out = capsys.readouterr().out
    assert res["epoch"] == 2 and res["step"] == 8 and res["steps_per_epoch"] == 4
    assert f"fp16 loss scale {scale:g}" in out and "continues at epoch 2, step 8" in out
    assert "optim.blr" not in out and "schedule.warmup_epochs: official run 2, this config 1" in out
    assert os.path.basename(res["checkpoint"]) == "step_00000008"
    result = run(load_config(RECIPE, COMMON + [f"output_dir={cont}"]))
    assert result["step"] == 16 and result["steps_run"] == 8
    a, b = _losses(ref), _losses(cont)
    assert sorted(b) == list(range(9, 17))
    assert [b[s] for s in range(9, 17)] == [a[s] for s in range(9, 17)]   # loss and lr, bit for bit


def test_launcher_imports_and_refuses_bad_input(official_run, tmp_path):
    _, path, _, _ = official_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(REPO, "launchers/import_official.py")]
    ok = subprocess.run(cmd + [path, "--config", RECIPE, *COMMON, f"output_dir={tmp_path / 'run'}"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout.strip().splitlines()[-1])["step"] == 8
    again = subprocess.run(cmd + [path, "--config", RECIPE, *COMMON, f"output_dir={tmp_path / 'run'}"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr
    done = subprocess.run(cmd + [path, "--config", RECIPE, *COMMON, "schedule.epochs=2",
                                 f"output_dir={tmp_path / 'x'}"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "set schedule.epochs above 2" in done.stderr


def test_bad_official_files_are_refused(official_run, tmp_path):
    _, path, osd, _ = official_run
    ck = torch.load(path, weights_only=False)
    weights_only = str(tmp_path / "weights.pth")
    torch.save({"model": ck["model"]}, weights_only)
    with pytest.raises(OfficialImportError, match="no 'optimizer', 'epoch'.*checkpoint.init_from"):
        import_official_mae(RECIPE, COMMON + [f"output_dir={tmp_path / 'a'}"], weights_only)
    one_group = dict(ck, optimizer={"state": osd["state"], "param_groups": [
        {**osd["param_groups"][0], "params": sum((g["params"] for g in osd["param_groups"]), [])}]})
    p1 = str(tmp_path / "one_group.pth")
    torch.save(one_group, p1)
    with pytest.raises(OfficialImportError, match=r"groups of \[\d+\] parameters.*gives \[\d+, \d+\]"):
        import_official_mae(RECIPE, COMMON + [f"output_dir={tmp_path / 'b'}"], p1)
    with pytest.raises(OfficialImportError, match="engine.name=deepspeed"):
        import_official_mae(RECIPE, COMMON + [f"output_dir={tmp_path / 'c'}", "engine.name=deepspeed"], path)
    bigger = dict(ck, model={**ck["model"], "extra.weight": torch.zeros(2)})
    p2 = str(tmp_path / "extra_key.pth")
    torch.save(bigger, p2)
    with pytest.raises(ValueError, match="extra.weight"):
        import_official_mae(RECIPE, COMMON + [f"output_dir={tmp_path / 'd'}"], p2)
